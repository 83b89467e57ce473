"""Running the Triton server that ships in the nvidia-pytriton wheel."""
