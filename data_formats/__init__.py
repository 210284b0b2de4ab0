"""Fine-tuning data in any common shape, read into one canonical form (no torch, no transformers).

Alpaca, ShareGPT, chat ``messages``, preference (``prompt``/``chosen``/``rejected``) and Anthropic HH records, from
JSON Lines, JSON, parquet, CSV, ``datasets`` directories, hub ids or in-memory lists, become :class:`Conversation`
and :class:`PreferencePair` objects. Every malformed input raises one :class:`DataFormatError` that names the file,
the record and the field, or, with ``skip_invalid=True``, is skipped and counted in a :class:`LoadReport`. Files are
streamed record by record. The contract is in ``docs/data.md``.
"""

from .canonical import Conversation, DataFormatError, PreferencePair, validate_messages
from .cli import convert
from .loading import load_conversations, load_preferences
from .readers import CONVERSATION_FORMATS, FORMATS, PREFERENCE_FORMATS, detect_format
from .report import LoadReport, write_rejects
from .writers import write

__all__ = [
    "CONVERSATION_FORMATS",
    "FORMATS",
    "PREFERENCE_FORMATS",
    "Conversation",
    "DataFormatError",
    "LoadReport",
    "PreferencePair",
    "convert",
    "detect_format",
    "load_conversations",
    "load_preferences",
    "validate_messages",
    "write",
    "write_rejects",
]
