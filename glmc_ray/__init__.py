"""glmc-ray: GLMC long-tailed training and tuning on Ray."""
