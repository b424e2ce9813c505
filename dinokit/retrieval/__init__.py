"""Image retrieval: embeddings of an image collection in a FAISS index on disk, searched by image,
grouped into near-duplicates (retrieve.py)."""
