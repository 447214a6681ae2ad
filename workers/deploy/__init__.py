"""Web services (issue 16): what the deploy targets run, and the checks on what tenants attach.

``kubernetes``  the kubernetes target's objects, built with the official client's models
``kubeconfig``  the policy a tenant's kubeconfig must pass before anything uses it
"""
