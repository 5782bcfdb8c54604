CARGO ?= cargo

.PHONY: test fmt lint lint-deploy build bench chaos run clean

test: lint-deploy
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	$(CARGO) test --workspace --all-features

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

# Dockerfile, docker-compose.yml, k8s/ and deploy/, offline (scripts/lint-deploy.sh).
lint-deploy:
	bash scripts/lint-deploy.sh

build:
	$(CARGO) build --workspace --release

bench:
	bash scripts/bench.sh

# The chaos test, longer (200k events) and in release; `make test` runs it at 20k events.
# TICKFLOW_CHAOS_EVENTS / _RATE / _SEED override.
chaos:
	TICKFLOW_CHAOS_EVENTS=$${TICKFLOW_CHAOS_EVENTS:-200000} TICKFLOW_CHAOS_RATE=$${TICKFLOW_CHAOS_RATE:-4000} \
		$(CARGO) test --release -p e2e --test it chaos -- --nocapture

run:
	bash scripts/run-local.sh

clean:
	$(CARGO) clean
