"""The datamodule end to end on a tiny local text file: batch layout, determinism, and a short Lightning run."""

import pytest
import pytorch_lightning as pl
import torch

from perceiver_cli.data.datamodule import TextDataModule
from perceiver_cli.data.masking import IGNORE_INDEX
from perceiver_cli.errors import UserError

WORDS = "the quick brown fox jumps over a lazy dog while birds sing in tall green trees".split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    generator = torch.Generator().manual_seed(0)
    paragraphs = []
    for _ in range(80):
        n = int(torch.randint(5, 30, (1,), generator=generator))
        paragraphs.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=generator)) + ".")
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return str(path)


def _module(task, text_file, **kwargs):
    options = dict(source="files", path=text_file, max_seq_len=32, batch_size=4, validation_fraction=0.1)
    dm = TextDataModule(task, **{**options, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _check_layout(batch, batch_size, max_len):
    assert set(batch) == {"input_ids", "labels", "pad_mask"}
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["pad_mask"].dtype == torch.bool
    b, n = batch["input_ids"].shape
    assert b <= batch_size and n <= max_len
    assert batch["labels"].shape == batch["pad_mask"].shape == (b, n)
    assert (batch["labels"][batch["pad_mask"]] == IGNORE_INDEX).all()


def test_clm_batches(text_file):
    dm = _module("clm", text_file)
    assert dm.vocab_size == 262 and dm.max_seq_len == 32 and dm.tokenizer.padding_side == "left"
    train = list(dm.train_dataloader())
    for batch in train:
        _check_layout(batch, 4, 32)
        real = ~batch["pad_mask"][:, :-1]  # with left padding, the position after a real token is real too
        assert torch.equal(batch["labels"][:, :-1][real], batch["input_ids"][:, 1:][real])  # labels: next token
    assert train[0]["input_ids"].shape == (4, 32)
    last = list(dm.val_dataloader())[-1]
    _check_layout(last, 4, 32)
    padded = last["pad_mask"].any(dim=1)
    assert padded.any() and not last["pad_mask"][:, -1].any()  # left padding: real tokens end every row
    summary = dm.describe()
    assert summary["train"]["chunks"] == len(dm.train_dataloader().dataset)
    assert 32 * (summary["train"]["chunks"] - 1) < summary["train"]["tokens"] <= 33 * summary["train"]["chunks"]


def test_mlm_batches(text_file):
    dm = _module("mlm", text_file)
    assert dm.tokenizer.padding_side == "right"
    for batch in dm.train_dataloader():
        _check_layout(batch, 4, 32)
        assert (batch["input_ids"][:, 0] == dm.tokenizer.cls_token_id).all()
        assert ((batch["labels"] != IGNORE_INDEX).sum(dim=1) >= 1).all()
    last = list(dm.val_dataloader())[-1]
    assert last["pad_mask"][:, 0].logical_not().all()  # right padding: real tokens start every row


def test_loaders_are_deterministic(text_file):
    def first_epochs(dm):
        loader = dm.train_dataloader()
        epochs = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)  # as Lightning does before each epoch
            epochs.append([b["input_ids"] for b in loader])
        return epochs

    for task, options in (("clm", {"random_shift": True}), ("mlm", {})):
        a = first_epochs(_module(task, text_file, seed=7, **options))
        b = first_epochs(_module(task, text_file, seed=7, **options))
        c = first_epochs(_module(task, text_file, seed=8, **options))
        assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))  # same seed, same batches
        assert not all(torch.equal(x, y) for x, y in zip(a[0], a[1]))  # new order and masks each epoch
        assert not all(torch.equal(x, y) for x, y in zip(a[0], c[0]))  # another seed, other batches


def test_mlm_validation_masks_are_static(text_file):
    dm = _module("mlm", text_file)
    first = [b["input_ids"] for b in dm.val_dataloader()]
    again = [b["input_ids"] for b in dm.val_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_worker_processes_give_the_same_kind_of_batches(text_file):
    dm = _module("mlm", text_file, num_workers=1)
    loader = dm.train_dataloader()  # Lightning makes one loader per fit and iterates it every epoch
    epochs = [[b["labels"] for b in loader] for _ in range(2)]
    assert not all(torch.equal(x, y) for x, y in zip(*epochs))  # workers do not repeat last epoch's masks


def test_bad_options(text_file):
    with pytest.raises(UserError, match="unknown task"):
        TextDataModule("translation")
    with pytest.raises(UserError, match="random_shift"):
        TextDataModule("mlm", random_shift=True)
    with pytest.raises(UserError, match="mask probability"):
        TextDataModule("mlm", mask_prob=2.0)
    with pytest.raises(UserError, match="tokenizer 'nope' not found"):
        TextDataModule("clm", tokenizer="nope")
    with pytest.raises(UserError, match="batch size"):
        TextDataModule("clm", batch_size=0)


class _TinyLM(pl.LightningModule):
    """Just enough of a model to drive the datamodule through Lightning's fit loop."""

    def __init__(self, vocab_size):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)

    def _loss(self, batch):
        logits = self.head(self.embedding(batch["input_ids"]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def training_step(self, batch, _):
        return self._loss(batch)

    def validation_step(self, batch, _):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_lightning_fit(text_file, task, tmp_path):
    dm = TextDataModule(task, source="files", path=text_file, max_seq_len=32, batch_size=4)
    trainer = pl.Trainer(
        max_steps=3, limit_val_batches=2, val_check_interval=3, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(_TinyLM(dm.vocab_size), datamodule=dm)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
