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
	$(CARGO) run --release -p streams-core --example stage_bench

run:
	@echo "make run arrives with the services (issue 3)"; exit 1

clean:
	$(CARGO) clean
