"""The contract shared by the coordinator and the agent.

`protos.fleet.v1` holds the generated protobuf code (``make protos``); the modules
beside it (errors, manifest signing) are the hand-written parts both sides use.
`cloud` and `agent` never import each other: they meet here.
"""
