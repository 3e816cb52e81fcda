"""Documents -> contexts: the core's packing (klgap.job.packing), used by the `text`, `sample` and `hf` sources."""

from klgap.job.packing import pack, separator_id, tokenize_documents

__all__ = ["pack", "separator_id", "tokenize_documents"]
