"""The coordinator's gRPC API: wire conversions (`convert`) shared by server and clients."""
