"""``gateway demo``: the simulator and a gateway on the embedded store, in one process."""
from __future__ import annotations

import asyncio
import secrets

from aiohttp import web

from gateway.keytool import hash_key
from gateway.config import Config
from gateway.config.loader import parse

DEMO_LATENCY_MS = 800  # long enough to see streaming happen, short enough to stay fun

SNIPPET = """\
Demo gateway on http://127.0.0.1:{port}  (upstream: the simulator on {sim_url})
Team "demo" key: {key}

curl: generate an image and save it
  curl -s http://127.0.0.1:{port}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "google/gemini-3-pro-image-preview", "messages": [{{"role": "user", "content": "a lighthouse at dawn"}}]}}' \\
  | python3 -c 'import sys,json,base64; u=json.load(sys.stdin)["choices"][0]["message"]["images"][0]["image_url"]["url"]; open("image.jpg","wb").write(base64.b64decode(u.split(",",1)[1])); print("saved image.jpg")'

Python (pip install openai):
  import base64, openai
  client = openai.OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="{key}")
  r = client.chat.completions.create(model="google/gemini-3-pro-image-preview",
      messages=[{{"role": "user", "content": "a lighthouse at dawn"}}])
  url = r.choices[0].message.model_extra["images"][0]["image_url"]["url"]
  open("image.jpg", "wb").write(base64.b64decode(url.split(",", 1)[1]))

Images API (OpenAI's images.generate / images.edit, served by the same model):
  r = client.images.generate(prompt="a lighthouse at dawn", size="1536x1024", n=2, response_format="b64_json")
  open("lighthouse.jpg", "wb").write(base64.b64decode(r.data[0].b64_json))
  r = client.images.edit(image=open("lighthouse.jpg", "rb"), prompt="the same lighthouse at night")

Image links instead of base64 (a few hundred bytes; the link works without a key until it expires):
  curl -s http://127.0.0.1:{port}/v1/images/generations \
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \
    -d '{{"prompt": "a lighthouse at dawn", "size": "1024x1024", "response_format": "url"}}'
  curl -s http://127.0.0.1:{port}/v1/chat/completions -H "X-Image-Delivery: url" \
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \
    -d '{{"model": "google/gemini-3-pro-image-preview", "messages": [{{"role": "user", "content": "a fox"}}]}}'

Usage so far:  curl -s -H "Authorization: Bearer {key}" http://127.0.0.1:{port}/v1/usage
Metrics:       curl -s http://127.0.0.1:{port}/metrics
Ctrl-C stops both.
"""


def demo_config(port: int, sim_url: str, sim_key: str, team_key: str) -> Config:
    return parse(
        {
            "server": {"host": "127.0.0.1", "port": port},
            "upstream": {"base_url": sim_url, "api_key": sim_key, "max_retries": 1},
            "store": {"url": "memory://"},
            "images": {"signing_key": secrets.token_urlsafe(32)},  # links for this run only
            "teams": [
                {
                    "name": "demo",
                    "keys": ["sha256:" + hash_key(team_key)],
                    "limits": {"requests_per_minute": 30, "tokens_per_minute": 200000, "max_concurrent": 4},
                    "quota": {"tokens_per_day": 2000000, "usd_per_month": 50},
                }
            ],
            "logging": {"level": "info", "format": "text"},
        }
    )


def run_demo(port: int) -> int:
    from gateway.observability.accesslog import configure_logging
    from gateway.server import use_uvloop

    use_uvloop()
    return asyncio.run(_demo(port, configure_logging))


async def _demo(port: int, configure_logging) -> int:
    from gateway.http.app import create_app
    from gateway.server import GatewayRunner, stop_on_signals
    from gateway.simulator import create_app as create_simulator

    stop = stop_on_signals()
    sim_key = secrets.token_urlsafe(24)
    team_key = "gw-demo-" + secrets.token_urlsafe(24)
    sim_runner = web.AppRunner(create_simulator(api_key=sim_key, latency_ms=DEMO_LATENCY_MS), access_log=None)
    await sim_runner.setup()
    await web.TCPSite(sim_runner, "127.0.0.1", 0).start()
    sim_url = f"http://127.0.0.1:{sim_runner.addresses[0][1]}"
    config = demo_config(port, sim_url, sim_key, team_key)
    configure_logging(config.logging)
    runner = GatewayRunner(create_app(config))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    bound = runner.addresses[0][1]
    print(SNIPPET.format(port=bound, sim_url=sim_url, key=team_key), flush=True)
    await stop.wait()
    await runner.cleanup()
    await sim_runner.cleanup()
    return 0
