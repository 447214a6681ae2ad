from mms_client.cli import main

main()
