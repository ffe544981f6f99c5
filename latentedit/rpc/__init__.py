"""The RPC layer: server scaffolding, service launch, and gRPC clients (the remote World).

The core library (methods, models, world, wire types) never imports from here.
"""
