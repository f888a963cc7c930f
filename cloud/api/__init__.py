"""The coordinator's gRPC API: wire conversions (`convert`) shared by server and clients."""

#: the client's deadline for Deploy is the deploy timeout plus this; the server waits for
#: devices until the deadline minus this, so the final DeployResult always gets through
DEPLOY_DEADLINE_MARGIN = 5.0
DEFAULT_DEPLOY_TIMEOUT = 300.0
