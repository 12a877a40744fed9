"""gRPC transport of a deployment: protobuf messages, the server side and the client side.

The only place that imports ``grpc``; ``atoll.deploy`` builds the coordinator and the client on it.
"""
