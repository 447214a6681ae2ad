"""Web services (issue 16): what the deploy targets run, and the checks on what tenants attach.

``local_network``  each service's own contained network on the workers' engine (``local``)
``kubernetes``     the kubernetes target's objects, built with the official client's models
``kubernetes_driver``  the kubernetes target's driver: applies them, reads what the cluster runs
``kubeconfig``     a tenant's kubeconfig checked before connecting: the service's policy
                   (app/deployments/kubeconfig.py) plus where each server's address leads
"""
