"""The image pipeline: data sets and their checks, the loaders, the two augmented views."""
