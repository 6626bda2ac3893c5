"""A sequence classifier's head over the mean of its token states (``llmos_pooling: mean``): the
served scores, the ONNX export and a fine-tune's result compute that mean; the option is refused
where it cannot apply."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModel, AutoTokenizer

from llmos.engine.torch_backend.head_pooling import CONFIG_KEY
from llmos.platform import Platform
from tests.unit.test_api import assert_error, auth
from tests.unit.test_fine_tuning import wait_for
from tests.unit.test_rerank import DOCUMENTS, QUERY, build_cross_encoder, post

PAIRS = {"where is paris": "paris is the capital of france", "how are you": "i am fine thank you"}


def mean_pooled_cross_encoder(encoder_dir: Path, root: Path) -> Path:
    build_cross_encoder(encoder_dir, root)
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, CONFIG_KEY: "mean"}))
    return root


def logits_by_hand(directory: Path, query: str, documents: list[str]) -> torch.Tensor:
    """The head's linear layer over the average of each pair's real token states, computed from
    the saved weights without the platform's code."""
    from safetensors.torch import load_file

    weights = load_file(str(directory / "model.safetensors"))
    encoder = AutoModel.from_pretrained(directory, add_pooling_layer=False).eval()
    batch = AutoTokenizer.from_pretrained(directory)(
        [query] * len(documents), documents, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        states = encoder(**batch).last_hidden_state
    means = torch.stack(
        [row[mask.bool()].mean(dim=0) for row, mask in zip(states, batch["attention_mask"], strict=True)]
    )
    return means @ weights["classifier.weight"].T + weights["classifier.bias"]


def by_hand(directory: Path, query: str, documents: list[str]) -> list[float]:
    """A one-label cross-encoder's relevance: the sigmoid of its logit."""
    return torch.sigmoid(logits_by_hand(directory, query, documents)[:, 0]).tolist()


@pytest.fixture
def mean_encoder(loaded_platform: Platform, tiny_encoder_dir: Path, tmp_path: Path) -> Path:
    directory = mean_pooled_cross_encoder(tiny_encoder_dir, tmp_path / "mean-ce")
    loaded_platform.registry.pull(f"file:{directory}", name="tiny-mean-ce")
    return directory


def test_a_mean_pooled_cross_encoder_scores_the_mean_of_its_token_states(http: TestClient, mean_encoder: Path) -> None:
    expected = by_hand(mean_encoder, QUERY, DOCUMENTS)
    scored = post(http, "/v1/score", {"model": "tiny-mean-ce", "text_1": QUERY, "text_2": DOCUMENTS})
    assert [d["score"] for d in scored["data"]] == pytest.approx(expected, abs=1e-5)
    ranked = post(http, "/v1/rerank", {"model": "tiny-mean-ce", "query": QUERY, "documents": DOCUMENTS})
    assert {r["index"]: r["relevance_score"] for r in ranked["results"]} == pytest.approx(
        dict(enumerate(expected)), abs=1e-5
    )
    # /v1/classifications reads the same forward: one label, so its one probability is 1.
    classified = http.post("/v1/classifications", headers=auth(), json={"model": "tiny-mean-ce", "input": QUERY})
    assert classified.status_code == 200, classified.text


def test_the_onnx_export_of_a_mean_pooled_classifier_computes_the_mean(
    http: TestClient, mean_encoder: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxscript", reason="ONNX export needs the export extra")
    onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX exports are verified in onnxruntime")
    from tests.unit.test_export import _download, _export, _untar

    op = _export(http, "tiny-mean-ce", "onnx")
    assert op["status"] == "succeeded", op
    directory = _untar(_download(http, op["file_id"]), tmp_path / "out")
    documents = [*DOCUMENTS, "paris"]  # another batch size and padding than the export traced
    batch = AutoTokenizer.from_pretrained(directory)(
        [QUERY] * len(documents), documents, padding=True, return_tensors="np"
    )
    session = onnxruntime.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()})
    assert (1 / (1 + np.exp(-logits[:, 0]))).tolist() == pytest.approx(
        by_hand(mean_encoder, QUERY, documents), abs=1e-5
    )


def test_a_fine_tune_with_mean_pooling_saves_and_serves_it(
    client: openai.OpenAI, http: TestClient, loaded_platform: Platform
) -> None:
    rows = [{"text": q, "text_pair": p, "label": int(PAIRS[q] == p)} for q in PAIRS for p in PAIRS.values()] * 2
    training = client.files.create(
        file=("pairs.jsonl", "\n".join(json.dumps(r) for r in rows).encode()), purpose="fine-tune"
    )
    method: Any = {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"n_epochs": 1, "batch_size": 4},
            "adapter": {"type": "full"},
            "pooling": "mean",
        },
    }
    job = client.fine_tuning.jobs.create(model="tiny-embed", training_file=training.id, method=method)
    done: Any = wait_for(client, job.id, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error
    directory = loaded_platform.registry.model_dir(loaded_platform.registry.get(done.fine_tuned_model))
    assert json.loads((directory / "config.json").read_text())[CONFIG_KEY] == "mean"
    documents = list(PAIRS.values())
    query = next(iter(PAIRS))
    out = post(http, "/v1/score", {"model": done.fine_tuned_model, "text_1": query, "text_2": documents})
    probabilities = [d["score"] for d in out["data"]]  # two labels: the probability of label "1"
    expected = torch.softmax(logits_by_hand(directory, query, documents), dim=-1)[:, 1]
    assert probabilities == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.parametrize(
    ("model", "pooling", "param"),
    [
        ("tiny-embed", "max", "method.supervised.pooling"),
        ("tiny-embed", ["mean"], "method.supervised.pooling"),
        ("tiny-chat", "mean", "method.supervised.pooling"),  # a chat fine-tune has no classifier head
    ],
)
def test_bad_pooling_is_refused_naming_it(http: TestClient, model: str, pooling: Any, param: str) -> None:
    is_pairs = model == "tiny-embed"
    row = (
        {"text": "a", "text_pair": "b", "label": 1}
        if is_pairs
        else {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    upload = http.post(
        "/v1/files",
        headers=auth(),
        files={"file": ("t.jsonl", (json.dumps(row) + "\n") * 4)},
        data={"purpose": "fine-tune"},
    )
    assert upload.status_code == 200, upload.text
    body = {
        "model": model,
        "training_file": upload.json()["id"],
        "method": {"type": "supervised", "supervised": {"adapter": {"type": "full"}, "pooling": pooling}},
    }
    assert_error(http.post("/v1/fine_tuning/jobs", headers=auth(), json=body), 400, param=param)
    assert http.get("/v1/fine_tuning/jobs", headers=auth()).json()["data"] == []  # nothing queued


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_mean_pooling_needs_a_bert_style_head(tiny_encoder_dir: Path, tmp_path: Path, pooling: str) -> None:
    """DistilBERT's head has a layer before its classifier, which a mean would skip: refused before
    any job is queued; [CLS] (transformers' own forward) and a BERT head take it."""
    import shutil

    from transformers import DistilBertConfig

    from llmos.errors import InvalidRequestError
    from llmos.training.preflight import check_against_model
    from llmos.training.spec import TrainingSpec

    distil = tmp_path / "distil"
    shutil.copytree(
        tiny_encoder_dir, distil, ignore=shutil.ignore_patterns("*.safetensors", "modules.json", "config.json")
    )
    DistilBertConfig(
        vocab_size=152, dim=32, hidden_dim=64, n_layers=1, n_heads=4, max_position_embeddings=128
    ).save_pretrained(distil)
    spec = TrainingSpec(adapter="full", pooling=pooling)
    check_against_model(spec, "sequence-classification", tiny_encoder_dir, name="tiny-embed", examples=4)
    if pooling == "cls":
        check_against_model(spec, "sequence-classification", distil, name="tiny-distil", examples=4)
        return
    with pytest.raises(InvalidRequestError, match="BERT-style head") as refused:
        check_against_model(spec, "sequence-classification", distil, name="tiny-distil", examples=4)
    assert refused.value.param == "method.supervised.pooling"
