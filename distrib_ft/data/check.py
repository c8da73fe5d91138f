"""The driver's look at the data before any worker starts: the first records of every file, with its format.

Workers still check every record while they prepare the data (distrib_ft/data/formats.py); this catches the
common mistakes -- a missing or empty file, a line that is not JSON, a record without the fields its format
needs, a chat format without a chat template -- in seconds instead of after Ray has started the workers and
loaded the model.
"""

from __future__ import annotations

import itertools

from distrib_ft.data.formats import IGNORE_INDEX, DataError, encode_record, resolve_template, validate_record
from distrib_ft.data.replay_buffer import iter_records

FIRST = 64  # records checked per file


def check_files(files: list[str], fmt: str, *, key: str, tokenizer=None, max_seq_length: int = 512,
                prompt_template: str = "auto", text_field: str = "text", need_targets: bool = False) -> None:
    """Validate the first :data:`FIRST` records of each file for ``fmt``; encode them too when a tokenizer is given.

    Args:
        files: the files (absolute paths or URLs) of the job key ``key`` (e.g. ``data.train_files``).
        fmt: their data format (alpaca, chat, text, tokenized).
        key: the job key that lists them, for the error line.
        tokenizer: the model's tokenizer (checks the chat template and encodes), or None (fields only).
        max_seq_length: ``data.max_seq_length``.
        prompt_template: ``data.prompt_template``.
        text_field: ``data.text_field``.
        need_targets: with a tokenizer, when every file was read whole, some record must keep a target token
            within ``max_seq_length`` (the workers would otherwise find no example to train or evaluate on).

    Raises:
        DataError: one line naming the file, the line (or record) and the field, or the key.
    """
    if tokenizer is not None and fmt in ("chat", "alpaca"):
        template = resolve_template(tokenizer, prompt_template)
        if (fmt == "chat" or template == "chat") and not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{files[0]}: {key}: format {fmt!r} needs a chat template but the tokenizer has none "
                            "(use a chat model's tokenizer, or format=alpaca with data.prompt_template=alpaca)")
    whole, records, learnable = True, 0, False
    for path in files:
        seen = 0
        for where, record in itertools.islice(iter_records(path), FIRST + 1):
            if seen == FIRST:  # the file goes on past what the driver reads
                whole = False
                break
            validate_record(record, fmt, where, text_field)
            if tokenizer is not None:
                ex = encode_record(record, fmt, where, tokenizer=tokenizer, max_seq_length=max_seq_length,
                                   prompt_template=prompt_template, text_field=text_field)
                learnable = learnable or any(label != IGNORE_INDEX for label in ex["labels"][1:])
            seen += 1
        if not seen:
            raise DataError(f"{path}: {key}: no records (the file is empty)")
        records += seen
    if need_targets and tokenizer is not None and whole and not learnable:
        raise DataError(f"{files[0]}: {key}: no target token left in any of the {records} record(s) within "
                        f"data.max_seq_length={max_seq_length} (the prompt fills it, or there is no response): "
                        "raise data.max_seq_length or shorten the prompts")
