"""Generated protobuf and gRPC code (service/grpc_api/codegen.py)."""
