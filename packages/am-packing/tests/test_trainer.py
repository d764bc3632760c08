"""With the real transformers.Trainer (and TRL's SFTTrainer when installed): packed training gives the padded
baseline's per-step losses and token counts, and forgetting enable_packing raises.

Tiny Llama, CPU fp32, 8 steps of 4 examples, no saving, no reporting. The baseline pads each batch and masks
padding (and position 0, which no causal-LM loss scores anyway: it keeps the label count identical on every
transformers version, whether or not its Trainer counts labels after the shift).
"""

from __future__ import annotations

import pytest
import torch

from am_packing import PackingCollator, enable_packing

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (test extra)")

STEPS, BATCH = 8, 4
LOSS_ATOL = 1e-5


def dataset(n: int = STEPS * BATCH, seed: int = 3) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 16, (n,), generator=g).tolist()
    return [{"input_ids": torch.randint(3, 128, (k,), generator=g).tolist()} for k in lengths]


def pad_collate(examples):
    """The padded baseline: right padding, 0/1 mask, -100 on padding and on position 0."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, e in enumerate(examples):
        ids[r, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[r, : len(e["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _trainer_class():
    from transformers import Trainer

    class RecordingTrainer(Trainer):
        """Trainer that keeps every step's loss unrounded (the logs round it)."""

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.losses.append(float(loss))
            return loss

    return RecordingTrainer


def _common_args(tmp_path) -> dict:
    """Training arguments both trainers share: 8 constant-LR steps on CPU, nothing saved or reported."""
    return dict(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_strategy="no",
        dataloader_num_workers=0,
    )


def train(model, collator, tmp_path, **extra):
    from transformers import TrainingArguments

    args = TrainingArguments(
        **_common_args(tmp_path),
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=dataset(), data_collator=collator, **extra
    )
    trainer.losses = []
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    def build():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)

    trainer = train(build(), pad_collate, tmp_path_factory.mktemp("baseline"))
    return build, trainer.losses, trainer.state.num_input_tokens_seen


def test_indexed_mode_with_enable_packing_equals_padded(baseline, tmp_path):
    build, losses, tokens = baseline
    model = build()
    with enable_packing(model):
        trainer = train(model, PackingCollator(64), tmp_path)
    assert len(trainer.losses) == STEPS
    torch.testing.assert_close(torch.tensor(trainer.losses), torch.tensor(losses), atol=LOSS_ATOL, rtol=0)
    assert trainer.state.num_input_tokens_seen == tokens  # DocumentIdMask.sum() counts tokens, not ids


def test_position_ids_mode_equals_padded_without_any_patch(baseline, tmp_path):
    build, losses, tokens = baseline
    trainer = train(build(), PackingCollator(64, mode="position_ids"), tmp_path)
    torch.testing.assert_close(torch.tensor(trainer.losses), torch.tensor(losses), atol=LOSS_ATOL, rtol=0)
    assert trainer.state.num_input_tokens_seen == tokens  # no padding: every counted token is real


def test_forgetting_enable_packing_raises(baseline, tmp_path):
    build, _, _ = baseline
    with pytest.raises(ValueError, match=r"DocumentIdMask.*enable_packing\(model\)"):
        train(build(), PackingCollator(64), tmp_path)


# --------------------------------------------------------------------------- TRL
def tiny_tokenizer():
    """A word-level tokenizer built in memory (no download): tokens "t3".."t127", pad "[PAD]" = 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"t{i}": i for i in range(3, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def sft_train(model, tmp_path, collator=None):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **_common_args(tmp_path),
        packing=False,  # TRL refuses custom collators with its own packing; ours packs per batch
        max_length=None,
        bf16=False,  # SFTConfig defaults to bf16 autocast (also on CPU); the comparison is fp32
    )
    data = Dataset.from_list(dataset())
    trainer_class = _sft_trainer_class(SFTTrainer)
    trainer = trainer_class(
        model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer(), data_collator=collator
    )
    if collator is None:
        trainer.data_collator = _position_zero_unscored(trainer.data_collator)
    trainer.losses = []
    trainer.train()
    return trainer


def _position_zero_unscored(collate):
    """TRL's own padding collator, with position 0 unlabelled as in `pad_collate`.

    No causal-LM loss scores position 0, but transformers 5.3's Trainer counted labels before the shift:
    left in, it divides the padded run's loss by one extra label per row (up to 0.78 lower here, 4 rows of ~8
    tokens), while a packed row already carries -100 at every document start.
    """

    def collate_batch(examples):
        batch = collate(examples)
        batch["labels"][:, 0] = -100
        return batch

    return collate_batch


def _sft_trainer_class(base):
    class RecordingSFTTrainer(base):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.losses.append(float(loss))
            return loss

    return RecordingSFTTrainer


def test_trl_sft_trainer_with_our_collator_equals_its_padded_run(baseline, tmp_path):
    pytest.importorskip("trl", reason="trl is not installed (add it to the test extra)")
    pytest.importorskip("datasets")
    build, _, _ = baseline
    padded = sft_train(build(), tmp_path / "padded")
    model = build()
    collator = PackingCollator.from_tokenizer(tiny_tokenizer(), 64)
    with enable_packing(model):
        packed = sft_train(model, tmp_path / "packed", collator)
    assert len(packed.losses) == STEPS
    torch.testing.assert_close(
        torch.tensor(packed.losses), torch.tensor(padded.losses), atol=LOSS_ATOL, rtol=0
    )
    assert packed._metrics["train"]["num_tokens"] == padded._metrics["train"]["num_tokens"]
