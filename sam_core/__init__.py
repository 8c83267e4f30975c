"""samforge ML library: models, preprocessing, predictor, fine-tuning. Knows nothing of gRPC."""
