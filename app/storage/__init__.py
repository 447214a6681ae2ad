"""Asset storage backends behind one small interface, chosen by MMS_ASSET_STORE."""
