"""Image classification on frozen embeddings (classify.py): image folders, embeddings, kNN and linear probe."""
