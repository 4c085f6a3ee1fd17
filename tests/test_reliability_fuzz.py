"""Schema fuzzing: schemathesis generates requests from the service's own OpenAPI schema and sends them
in-process (ASGI). No response may be a 5xx, every response must match the schema, and every error body
must be RFC 9457 problem details.

CI runs a bounded number of examples per operation. The longer run (docs/reliability.md):

    FUZZ_EXAMPLES=1000 .venv/bin/pytest tests/test_reliability_fuzz.py -p no:cacheprovider
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi import checks as oas

from tests.toy_bundle import make_toy_bundle

KEY = "fuzz-key-0123456789abcdef"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
DERANDOMIZE = "FUZZ_EXAMPLES" not in os.environ  # CI replays the same cases; a longer run explores new ones
PROBLEM_FIELDS = {"type", "title", "status", "detail"}


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from service.app.main import create_app
    from service.settings import Settings

    models: Path = tmp_path_factory.mktemp("fuzz-models")
    make_toy_bundle(models / "toy")
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.upper().startswith("ANOSCOPE_"):
                mp.delenv(name)
        settings_ = Settings(
            _env_file=None, model_dir=models, providers=("cpu",), intra_op_threads=1, api_keys=KEY,
            max_body_bytes=2_000_000, max_pixels=4_000_000,
        )  # fmt: skip
    app = create_app(settings_)
    yield app
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()  # schemathesis started the app's lifespan; stop its batchers


@pytest.fixture(scope="module")
def api_schema(fuzzed_app: Any) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app, headers={"X-API-Key": KEY})


def problem_details(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx body is application/problem+json with the RFC 9457 members and the right status."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type == "application/problem+json", f"error body is {content_type!r}"
    body = response.json()
    missing = PROBLEM_FIELDS - set(body)
    assert not missing, f"problem details without {sorted(missing)}: {body}"
    assert body["status"] == response.status_code, body
    assert body["type"].startswith("urn:anoscope:problem:") and body["detail"], body
    return True


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx at all: the service has no intended 5xx for anything a client can send (no overload here)."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    return True


_BOOLS = {"0", "1", "true", "false", "yes", "no", "on", "off", "t", "f", "y", "n"}


def _known_query_valid(query: dict[str, Any] | None) -> bool:
    query = query or {}
    heatmap, regions = query.get("heatmap", "none"), query.get("regions", "true")
    return heatmap in ("none", "png", "overlay") and (isinstance(regions, bool) or str(regions).lower() in _BOOLS)


def negative_data_rejected(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis's negative-data check, less the two places the service is lenient on purpose: unknown query
    parameters are ignored (docs/api.md), and the API key header a negative case drops is sent by this test
    anyway (missing keys are fuzzed by `ignored_auth`)."""
    from schemathesis.core.parameters import ParameterLocation

    negative = {loc for loc, info in case.meta.components.items() if info.mode.is_negative}
    lenient = {ParameterLocation.HEADER}
    if _known_query_valid(case.query):
        lenient.add(ParameterLocation.QUERY)
    if negative and negative <= lenient:
        return None
    return oas.negative_data_rejection(ctx, response, case)


OPERATIONS = [
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("POST", "/v1/predict"),
    ("POST", "/v1/models/{name}/predict"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{name}"),
    ("POST", "/v1/models/{name}/reload"),
    ("GET", "/metrics"),
]
CHECKS = [
    oas.status_code_conformance,
    oas.content_type_conformance,
    oas.response_headers_conformance,
    oas.response_schema_conformance,
    negative_data_rejected,
    oas.ignored_auth,
    oas.unsupported_method,
    oas.missing_required_header,
    problem_details,
    no_server_error,
]


def test_every_operation_in_the_schema_is_fuzzed(api_schema: Any) -> None:
    found = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


def _real_images() -> list[bytes]:
    """A few genuine images, so fuzzed query parameters and names also reach scoring, heatmaps and regions."""
    from tests.badimages import BASE, encode

    return [encode(BASE, "PNG"), encode(BASE.resize((7, 300)), "JPEG"), encode(BASE.convert("L"), "BMP")]


def _with_real_bodies(strategy: Any, path: str) -> Any:
    """(case, swapped): for the predict operations half the cases carry a real image (and half name the loaded
    model) instead of the random bytes and names the schema alone can describe. A swap can make a negative
    case valid, so swapped cases skip the check that negative data is rejected."""
    from hypothesis import strategies as st

    if not path.endswith("predict"):
        return strategy.map(lambda case: (case, False))

    def swap(drawn: tuple[Any, bool, bytes, bool]) -> tuple[Any, bool]:
        case, real, image, named = drawn
        swapped = False
        if real and case.media_type is not None:
            case.body = {"files": [image]} if case.media_type.startswith("multipart/") else image
            swapped = True
        if named and "name" in case.path_parameters:
            case.path_parameters["name"] = "toy"
            swapped = True
        return case, swapped

    return st.tuples(strategy, st.booleans(), st.sampled_from(_real_images()), st.booleans()).map(swap)


STATUSES: Counter[int] = Counter()
# /healthz and /readyz take no input that could be made invalid: positive cases only.
FUZZED = [
    (m, p, mode)
    for m, p in OPERATIONS
    for mode in ("positive", "negative")
    if not (mode == "negative" and p in ("/healthz", "/readyz"))
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), FUZZED, ids=[f"{m} {p} {mode}" for m, p, mode in FUZZED])
def test_fuzzed_requests_get_schema_conforming_answers_and_never_a_5xx(api_schema, method, path, mode) -> None:
    from hypothesis import given
    from schemathesis import GenerationMode

    operation = api_schema[path][method]

    @given(drawn=_with_real_bodies(operation.as_strategy(generation_mode=GenerationMode(mode)), path))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=DERANDOMIZE,
    )
    def fuzz(drawn: tuple[Any, bool]) -> None:
        case, swapped = drawn
        checks = [c for c in CHECKS if not (swapped and c is negative_data_rejected)]
        response = case.call_and_validate(headers={"X-API-Key": KEY}, checks=checks)
        STATUSES[response.status_code] += 1

    fuzz()


def test_the_fuzzing_reached_success_and_error_paths(capsys: pytest.CaptureFixture[str]) -> None:
    if not STATUSES:
        pytest.skip("the fuzzing tests did not run in this session")
    with capsys.disabled():
        print(f"\nfuzzing: {sum(STATUSES.values())} requests, by status {dict(sorted(STATUSES.items()))}")
    assert STATUSES[200] > 0 and STATUSES[422] > 0  # scoring was reached, and so were the refusals
    assert not [status for status in STATUSES if status >= 500]
