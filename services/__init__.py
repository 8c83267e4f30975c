"""samforge gRPC services and the samforge CLI."""
