"""Channel-wise fully connected layer (Context Encoders): reference, Triton, C++/CUDA."""
