"""What a run measures beside the loss: the kNN monitor and the quality of the neighbors."""
