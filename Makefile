CARGO ?= cargo

.PHONY: test fmt lint build bench run clean

test:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	$(CARGO) test --workspace --all-features

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

build:
	$(CARGO) build --workspace --release

bench:
	bash scripts/bench.sh

run:
	bash scripts/run-local.sh

clean:
	$(CARGO) clean
