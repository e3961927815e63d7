"""BEIR-format retrieval data: loading with validation, splits, toy generation."""

from resume.data.beir import DataError, Document, RetrievalData, Split, load_beir
from resume.data.load import load_dataset, register_data_resolvers

__all__ = [
    "DataError",
    "Document",
    "RetrievalData",
    "Split",
    "load_beir",
    "load_dataset",
    "register_data_resolvers",
]
