# Monitoring: a real Prometheus on loopback scraping the server `make serve` started (docs/operations.md).
# Included by the main Makefile (PY, STAMP come from there).
PROMETHEUS_PORT ?= 9090

.PHONY: prometheus-setup monitor monitor-stop monitor-status monitor-check k8s-rule

prometheus-setup: ## Debian prometheus + promtool (as root), without the node exporter it recommends
	@{ command -v prometheus && command -v promtool; } >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq \
	    && apt-get install -y -qq --no-install-recommends prometheus; } \
	    || { echo "prometheus-setup: needs root to apt-get install prometheus (sudo apt-get install prometheus)" >&2; exit 1; }

monitor: $(STAMP) prometheus-setup ## Prometheus on 127.0.0.1:9090 with deploy/monitoring/, scraping `make serve`'s server [PROMETHEUS_PORT=9090]
	$(PY) -m serving.monitor start --port $(PROMETHEUS_PORT)

monitor-stop: ## stop the Prometheus `make monitor` started
	@$(PY) -m serving.monitor stop

monitor-status:
	@$(PY) -m serving.monitor status

monitor-check: prometheus-setup ## promtool: check the config and rules, run the rules' unit tests
	promtool check config deploy/monitoring/prometheus.yml
	promtool test rules deploy/monitoring/rules/tests/*.yml

k8s-rule: $(STAMP) ## write deploy/k8s/base/prometheusrule.yaml from deploy/monitoring/rules/ (after editing them)
	$(PY) -m serving.monitor k8s-rule
