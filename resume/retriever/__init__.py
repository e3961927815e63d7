"""Dense bi-encoder retriever: encoder + pooling (module.py), FAISS index and search (index.py)."""

from resume.retriever.module import DenseRetriever, build_retriever

__all__ = ["DenseRetriever", "build_retriever"]
