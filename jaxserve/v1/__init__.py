"""Generated gRPC code for protos/jaxserve/v1 (scripts/gen_protos.py); do not edit."""
