"""HomeIQ loads a served adapter as it loads its own: on its pinned transformers 4, with its own code.

HomeIQ's Ask AI service (`model_services/soft_prompt_adapter.py`) calls `AutoTokenizer` and
`AutoModelForSeq2SeqLM.from_pretrained` on its soft-prompt folder and generates through a
text2text-generation pipeline; where loading fails it logs a warning and goes on without the adapter.
scripts/test.sh installs HomeIQ's packages (`transformers>=4.46.1,<5`, `peft>=0.12,<1`) in a venv of
their own. The base model is built there too, as flan-t5-small was (by transformers 4, untied output
layer, T5's 100 `<extra_id_*>` tokens): a base saved by transformers 5 reads differently in 4.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import SettingsFactory, train_and_serve

ROOT = Path(__file__).resolve().parents[1]
HOMEIQ_PYTHON = ROOT / os.environ.get("HOMEIQ_VENV", ".venv-homeiq") / "bin" / "python"
QUERY = "Turn on the porch light at sunset"

BUILD_BASE = """
import json, sys, torch
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration
source, out = sys.argv[1:]
tokenizer = PreTrainedTokenizerFast(
    tokenizer_file=f"{source}/tokenizer.json", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
    additional_special_tokens=[f"<extra_id_{i}>" for i in range(100)], model_max_length=512,
)
tokenizer.save_pretrained(out)
dims = json.load(open(f"{source}/config.json"))
torch.manual_seed(0)
config = T5Config(
    vocab_size=len(tokenizer), d_model=dims["d_model"], d_ff=dims["d_ff"], d_kv=dims["d_kv"],
    num_layers=dims["num_layers"], num_decoder_layers=dims["num_decoder_layers"], num_heads=dims["num_heads"],
    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    decoder_start_token_id=tokenizer.pad_token_id, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    tie_word_embeddings=False,
)
T5ForConditionalGeneration(config).save_pretrained(out)
"""

HOMEIQ_LOADER = """
import json, sys, torch, transformers
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline
folder, query = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSeq2SeqLM.from_pretrained(folder)
generator = pipeline("text2text-generation", model=model, tokenizer=tokenizer, device=-1)
answer = generator(query, max_new_tokens=32, num_return_sequences=1, do_sample=False)[0]["generated_text"]
ids = tokenizer(query + " <extra_id_0> <extra_id_99>").input_ids
with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([ids[:4]])).logits
print(json.dumps({"version": transformers.__version__, "adapter": model.active_adapters(), "answer": answer,
                  "ids": ids, "logits": logits.flatten().tolist()}))
"""


def homeiq(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    if not HOMEIQ_PYTHON.is_file():
        pytest.fail(f"{HOMEIQ_PYTHON} is missing; run the README's test command, which installs it")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(HOMEIQ_PYTHON), "-c", code, *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_homeiq_on_transformers_4_loads_the_served_adapter_and_answers_as_we_do(
    make_settings: SettingsFactory, tiny_model: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from homeiq_trainer.training.engine import load_base_model

    base = tmp_path / "base-saved-by-transformers-4"
    homeiq(BUILD_BASE, str(tiny_model), str(base))
    latest = train_and_serve(make_settings(data={"max_samples": 60}, training={"base_model": str(base)}))

    loaded = json.loads(homeiq(HOMEIQ_LOADER, str(latest), QUERY).stdout.splitlines()[-1])
    assert loaded["version"].startswith("4.") and loaded["adapter"] == ["default"] and loaded["answer"].strip()
    # The same tokens, the two sentinels among them as single tokens...
    tokenizer = AutoTokenizer.from_pretrained(latest)
    ids = tokenizer(QUERY + " <extra_id_0> <extra_id_99>").input_ids
    sentinels = tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"])
    assert loaded["ids"] == ids and tokenizer.unk_token_id not in sentinels and set(sentinels) <= set(ids)
    # ...and the same model, adapter applied: its logits as ours (greedy text may part at near-ties).
    _, base_model = load_base_model(str(base), "cpu", bf16_weights=False)
    served = PeftModel.from_pretrained(base_model, str(latest.resolve())).eval()
    with torch.no_grad():
        ours = served(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([ids[:4]])).logits.flatten()
        with served.disable_adapter():
            plain = served(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([ids[:4]])).logits.flatten()
    theirs = torch.tensor(loaded["logits"])
    assert (theirs - ours).abs().max() < 1e-4 < (plain - ours).abs().max()
