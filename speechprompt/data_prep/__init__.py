"""Data preparation: manifests, feature readers, k-means quantizers and speech-to-unit conversion."""
