"""Networks: the ResNet v2, the attention pooling network, positions, and Selfie itself."""
