"""A HomeIQ-shaped demo database and a tiny local T5, for first runs, tests and benchmarks.

The Hugging Face Hub may be out of reach, so the demo model is built here: a Unigram tokenizer
trained on the demo sentences and a randomly initialised T5, saved with `save_pretrained` and
loaded back through the same `from_pretrained` path a real model takes.
"""

from __future__ import annotations

import json
import random
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOMS = ["porch", "kitchen", "living room", "bedroom", "garage", "hallway", "office", "bathroom", "garden"]
DEVICES = [
    ("light", "Light", "turn on"),
    ("switch", "Fan", "switch on"),
    ("cover", "Blinds", "close"),
    ("climate", "Thermostat", "set to 21 °C"),
    ("media_player", "Speaker", "pause"),
    ("lock", "Door Lock", "lock"),
]
TRIGGERS = [
    ("at sunset", "At sunset"),
    ("when I leave home", "When everyone leaves home"),
    ("every weekday at 7", "Every weekday at 07:00"),
    ("when motion is detected", "When motion is detected"),
    ("after 23:00", "Every day at 23:00"),
    ("if the door opens", "When the door opens"),
    ("bei Sonnenuntergang", "Bei Sonnenuntergang"),
]
ASK_AI_SCHEMA = """
CREATE TABLE IF NOT EXISTS ask_ai_queries (
    query_id TEXT PRIMARY KEY,
    original_query TEXT NOT NULL,
    user_id TEXT NOT NULL DEFAULT 'anonymous',
    parsed_intent TEXT,
    extracted_entities JSON,
    suggestions JSON,
    confidence REAL,
    processing_time_ms INTEGER,
    failure_reason TEXT,
    created_at DATETIME
)
"""


def make_query(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """One realistic Ask AI query and its best suggestion."""
    room = rng.choice(ROOMS)
    domain, device, verb = rng.choice(DEVICES)
    trigger_text, trigger_summary = rng.choice(TRIGGERS)
    name = f"{room.title()} {device}"
    entity = f"{domain}.{room.replace(' ', '_')}_{device.lower().replace(' ', '_')}"
    query = f"{verb.capitalize()} the {room} {device.lower()} {trigger_text}"
    if rng.random() < 0.2:
        query += " please 🙂"
    extra = rng.choice(
        [
            "",
            f" and turn it off again after {rng.randint(2, 90)} minutes",
            " only when nobody is home",
            f", but only if the outside temperature is below {rng.randint(5, 25)} degrees",
        ]
    )
    description = f"{trigger_summary}, {verb} {name} ({entity}){extra}."
    suggestion = {
        "suggestion_id": f"ask-ai-{rng.getrandbits(32):08x}",
        "description": description,
        "trigger_summary": trigger_summary,
        "action_summary": f"{verb.capitalize()} {entity}",
        "devices_involved": [name],
        "validated_entities": {name: entity},
        "capabilities_used": ["brightness"] if domain == "light" else [],
        "confidence": round(rng.uniform(0.5, 0.99), 3),
        "status": "draft",
    }
    return query, suggestion


def create_source_db(
    path: Path,
    rows: int = 200,
    *,
    bad_fraction: float = 0.1,
    seed: int = 7,
    start: datetime | None = None,
    wal: bool = False,
) -> Path:
    """Write a HomeIQ-shaped `ask_ai_queries` database with `rows` rows, `bad_fraction` of them unusable."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = start or datetime(2025, 11, 1, 8, 0, 0)
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(ASK_AI_SCHEMA)
    batch = []
    for i in range(rows):
        query, best = make_query(rng)
        created = (start + timedelta(minutes=7 * i, microseconds=rng.randint(0, 999_999))).isoformat(sep=" ")
        if rng.random() < bad_fraction:
            suggestions = rng.choice(["{not json", "null", "[]", '{"a": 1}', json.dumps([{"description": "  "}])])
        else:
            other = dict(best, description=f"Maybe: {best['description']}", confidence=str(best["confidence"] / 2))
            suggestions = json.dumps([other, best], ensure_ascii=False)
        batch.append((f"query-{i:08x}", query, "anonymous", "automate", suggestions, 0.8, created))
    conn.executemany(
        "INSERT INTO ask_ai_queries (query_id, original_query, user_id, parsed_intent, suggestions, "
        "confidence, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        batch,
    )
    conn.commit()
    conn.close()
    return path


def demo_sentences(n: int = 400, seed: int = 11) -> list[str]:
    """Text to train the demo tokenizer on."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        query, suggestion = make_query(rng)
        out += [query, suggestion["description"]]
    return out


def build_tiny_model(
    directory: Path,
    *,
    d_model: int = 64,
    d_ff: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    d_kv: int = 16,
    vocab_size: int = 512,
    dropout_rate: float = 0.0,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised T5 and a Unigram tokenizer trained on demo text into `directory`."""
    import torch
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import Unigram
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tokenizer.train_from_iterator(demo_sentences(), trainer=trainer)
    eos_id = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )
    fast.save_pretrained(directory)

    torch.manual_seed(seed)
    config = T5Config(  # type: ignore[call-arg]
        vocab_size=tokenizer.get_vocab_size(),
        d_model=d_model,
        d_ff=d_ff,
        d_kv=d_kv,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        pad_token_id=tokenizer.token_to_id("<pad>"),
        eos_token_id=eos_id,
        decoder_start_token_id=tokenizer.token_to_id("<pad>"),
        feed_forward_proj="gated-gelu",
        dropout_rate=dropout_rate,
        tie_word_embeddings=False,
    )
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory
