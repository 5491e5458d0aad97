from types import SimpleNamespace

import pytest

from ortq.errors import ConfigError
from ortq.tasks import TASKS, normalize_task, task_from_config, task_from_outputs


def test_task_from_config():
    assert task_from_config(SimpleNamespace(architectures=["BertForSequenceClassification"])) == "text-classification"
    assert task_from_config(SimpleNamespace(architectures=["LlamaForCausalLM"])) == "causal-lm"
    assert task_from_config(SimpleNamespace(architectures=["GPT2LMHeadModel"])) == "causal-lm"
    assert task_from_config(SimpleNamespace(architectures=["BertModel"])) == "feature-extraction"
    assert task_from_config(SimpleNamespace(architectures=None)) == "feature-extraction"
    assert task_from_config(SimpleNamespace()) == "feature-extraction"


def test_task_from_outputs():
    assert task_from_outputs(["last_hidden_state"], [(2, 5, 8)], ["input_ids", "attention_mask"]) == (
        "feature-extraction",
        "last_hidden_state",
    )
    assert task_from_outputs(["logits"], [(2, 3)], ["input_ids"]) == ("text-classification", "logits")
    assert task_from_outputs(["logits"], [(2, 5, 100)], ["input_ids", "attention_mask"]) == ("causal-lm", "logits")
    assert task_from_outputs(["sentence_embedding"], [(2, 8)], ["input_ids"]) == (
        "feature-extraction",
        "sentence_embedding",
    )
    assert task_from_outputs(["y"], [(2, 16)], ["x"]) == (None, None)


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("feature-extraction", "feature-extraction"),
        ("embeddings", "feature-extraction"),
        ("Classification", "text-classification"),
        ("text-generation-with-past", "causal-lm"),
        ("text-generation", "causal-lm-no-past"),
        (" causal-lm ", "causal-lm"),
    ],
)
def test_normalize_task_accepts_aliases(name, canonical):
    assert normalize_task(name) == canonical
    assert canonical in TASKS


def test_normalize_task_rejects_unknown_with_choices():
    with pytest.raises(ConfigError, match=r"recipe 'x': unknown task 'speech'; choose one of feature-extraction"):
        normalize_task("speech", where="recipe 'x'")
