"""Fine-tuning data in any common shape, read into one canonical form (no torch, no transformers).

Alpaca, ShareGPT, chat ``messages``, preference (``prompt``/``chosen``/``rejected``), Anthropic HH and unpaired
(``prompt``/``completion``/``label``, KTO's) records, from JSON Lines, JSON, parquet, CSV, ``datasets`` directories,
hub ids or in-memory lists, become :class:`Conversation`, :class:`PreferencePair` and :class:`UnpairedExample`
objects. Every malformed input raises one :class:`DataFormatError` that names the file, the record and the field,
or, with ``skip_invalid=True``, is skipped and counted in a :class:`LoadReport`. Files are streamed record by record. The contract is in ``docs/data.md``.
"""

from .canonical import Conversation, DataFormatError, PreferencePair, UnpairedExample, unpair, validate_messages
from .cli import convert
from .loading import load_conversations, load_preferences, load_unpaired
from .readers import CONVERSATION_FORMATS, FORMATS, PREFERENCE_FORMATS, UNPAIRED_FORMATS, detect_format, same_reply
from .report import LoadReport, write_rejects
from .writers import write

__all__ = [
    "CONVERSATION_FORMATS",
    "FORMATS",
    "PREFERENCE_FORMATS",
    "UNPAIRED_FORMATS",
    "Conversation",
    "DataFormatError",
    "LoadReport",
    "PreferencePair",
    "UnpairedExample",
    "convert",
    "detect_format",
    "same_reply",
    "unpair",
    "load_conversations",
    "load_preferences",
    "load_unpaired",
    "validate_messages",
    "write",
    "write_rejects",
]
