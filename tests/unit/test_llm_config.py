"""Building the Azure client from settings: endpoint, key from the environment, Entra ID."""

from __future__ import annotations

import importlib.util

import pytest
from azure.core.credentials import AzureKeyCredential

from agent.errors import ConfigError
from agent.llm import AzureChatModel, chat_model_from, credential_from
from tests.fakes.incidents import ai_settings

AI = ai_settings(azure_openai={"endpoint": "https://example.invalid/models"}).ai


def test_an_endpoint_is_required() -> None:
    with pytest.raises(ConfigError) as e:
        chat_model_from(ai_settings(azure_openai={"endpoint": ""}).ai, {})
    assert e.value.problems[0].startswith("ai.azure_openai.endpoint:")


async def test_the_key_comes_from_the_named_environment_variable() -> None:
    cred = credential_from(AI, {"SRE_TEST_LLM_KEY": "k1"})
    assert isinstance(cred, AzureKeyCredential) and cred.key == "k1"
    model = chat_model_from(AI, {"SRE_TEST_LLM_KEY": "k1"})
    try:
        assert isinstance(model, AzureChatModel)
        assert (model.deployment, model.temperature, model.timeout) == ("gpt-4o", 0.1, 2.0)
    finally:
        await model.close()
        await model.close()  # idempotent


@pytest.mark.skipif(
    importlib.util.find_spec("azure.identity") is not None, reason="azure-identity installed"
)
def test_without_a_key_or_azure_identity_the_configuration_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        credential_from(AI, {})
    assert "SRE_TEST_LLM_KEY" in e.value.problems[0] and "azure-identity" in e.value.problems[0]


def test_only_the_adapter_imports_the_vendor_sdk() -> None:
    """Vendor types stay in their adapter (agent/llm.py), as with kubernetes and aiokafka."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    pattern = re.compile(r"^\s*(from|import)\s+azure\b", re.M)
    offenders = [
        str(p.relative_to(root))
        for d in ("agent", "handlers", "streams")
        for p in (root / d).rglob("*.py")
        if pattern.search(p.read_text()) and p.name != "llm.py"
    ]
    assert offenders == []
