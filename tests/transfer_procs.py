"""A producer process for transfer tests: holds tensors, answers commands on stdin.

Prints one JSON line {"endpoint", "descs"} once its tensors are held, then reads commands:
`corrupt <name>` flips a byte of that tensor in the pool, `held` prints the held keys,
`exit` closes the exchange and exits.
"""

import json
import sys

import msgspec
import torch

from stagepool.common.config import TransferConfig
from stagepool.common.transfer import Exchange


def main() -> None:
    backend, spec = sys.argv[1], json.loads(sys.argv[2])
    total = sum(nbytes for nbytes in spec.values())
    exchange = Exchange(TransferConfig(backend=backend, pool_mb=(total >> 20) + 8,
                                       backoff_s=0.2, retries=1, timeout_s=2))
    generator = torch.Generator().manual_seed(len(spec))
    tensors = {name: torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)
               for name, nbytes in spec.items()}
    descs = exchange.put("job/encode", tensors)
    print(json.dumps({"endpoint": exchange.endpoint, "descs": msgspec.to_builtins(descs)}),
          flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "corrupt":
            desc = next(d for d in descs if d.name == args[0])
            offset = desc.address - exchange.pool.base + desc.nbytes // 2
            exchange.pool.bytes[offset] ^= 0xFF
            print("ok", flush=True)
        elif command == "held":
            print(json.dumps(exchange.held()), flush=True)
        elif command == "exit":
            break
    exchange.close()


if __name__ == "__main__":
    main()
