"""QA data and plain texts: samples, file formats, the built-in generator, tokenisation, masks."""

from cud.data.encoding import Batch, EncodedSample, batches, collate, encode_sample, encode_samples, format_prompt
from cud.data.formats import BUILTIN, load_qa
from cud.data.generator import fictitious_authors
from cud.data.samples import QASample
from cud.data.text import TextSettings, is_text, text_sample

__all__ = ["QASample", "load_qa", "BUILTIN", "fictitious_authors", "EncodedSample", "Batch",
           "encode_sample", "encode_samples", "collate", "batches", "format_prompt",
           "TextSettings", "is_text", "text_sample"]
