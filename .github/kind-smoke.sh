#!/usr/bin/env bash
# Smoke scenario of .github/workflows/kind.yaml, on a kind cluster named
# "kind" (nodes kind-control-plane, kind-worker, kind-worker2) without
# kube-proxy, with lbctl installed: three agnhost netexec pods behind a
# ClusterIP and a NodePort Service; requests from a pod to the ClusterIP
# (by address and by DNS name, which also goes through the kube-dns
# ClusterIP over UDP), from a node to another node's NodePort and from the
# runner to a NodePort. Every request must answer.
set -euo pipefail

ns=lb-smoke
image=registry.k8s.io/e2e-test-images/agnhost:2.53
node_port=30080
requests=12

kubectl create namespace "$ns"
kubectl -n "$ns" apply -f - <<YAML
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
spec:
  replicas: 3
  selector:
    matchLabels:
      app: echo
  template:
    metadata:
      labels:
        app: echo
    spec:
      containers:
        - name: netexec
          image: $image
          args: ["netexec", "--http-port=8080"]
          ports:
            - containerPort: 8080
          readinessProbe:
            httpGet:
              path: /hostname
              port: 8080
            periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  type: ClusterIP
  selector:
    app: echo
  ports:
    - name: http
      port: 80
      targetPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: echo-nodeport
spec:
  type: NodePort
  selector:
    app: echo
  ports:
    - name: http
      port: 80
      targetPort: 8080
      nodePort: $node_port
---
apiVersion: v1
kind: Pod
metadata:
  name: client
spec:
  containers:
    - name: client
      image: $image
      args: ["pause"]
YAML

kubectl -n "$ns" rollout status deployment/echo --timeout=180s
kubectl -n "$ns" wait --for=condition=Ready pod/client --timeout=180s
kubectl -n kube-system rollout status deployment/coredns --timeout=180s

cluster_ip=$(kubectl -n "$ns" get service echo -o jsonpath='{.spec.clusterIP}')
node_ip() {
  kubectl get node "$1" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}'
}
worker_ip=$(node_ip kind-worker)
worker2_ip=$(node_ip kind-worker2)
echo "ClusterIP $cluster_ip, kind-worker $worker_ip, kind-worker2 $worker2_ip"

# Runs "$@" until it answers, for up to a minute (the agent programs a new
# Service in milliseconds; the first answer also waits for the pods).
first_answer() {
  local i
  for i in $(seq 60); do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 1
  done
  "$@"
}

# $1 says what is asked; "$@" after it prints the answering pod's name.
# Every one of $requests requests must answer.
check() {
  local what=$1 i answer
  shift
  local answers=()
  if ! first_answer "$@" >/dev/null; then
    echo "FAIL: $what: no answer within a minute" >&2
    return 1
  fi
  for i in $(seq "$requests"); do
    if ! answer=$("$@"); then
      echo "FAIL: $what: request $i of $requests got no answer" >&2
      return 1
    fi
    answers+=("$answer")
  done
  echo "ok: $what: $requests/$requests answered, by $(printf '%s\n' "${answers[@]}" | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}')"
}

in_pod() {
  kubectl -n "$ns" exec client -- curl -sS --fail --max-time 5 "$@"
}
in_node() {
  local node=$1
  shift
  docker exec "$node" curl -sS --fail --max-time 5 "$@"
}
from_runner() {
  curl -sS --fail --max-time 5 "$@"
}

check "pod -> ClusterIP $cluster_ip:80" in_pod "http://$cluster_ip/hostname"
check "pod -> echo.$ns.svc.cluster.local (DNS through the kube-dns ClusterIP)" \
  in_pod "http://echo.$ns.svc.cluster.local/hostname"
check "kind-worker -> NodePort on kind-worker2 $worker2_ip:$node_port" \
  in_node kind-worker "http://$worker2_ip:$node_port/hostname"
check "kind-control-plane -> NodePort on kind-worker $worker_ip:$node_port" \
  in_node kind-control-plane "http://$worker_ip:$node_port/hostname"
check "runner -> NodePort on kind-worker $worker_ip:$node_port" \
  from_runner "http://$worker_ip:$node_port/hostname"

kubectl -n lb-system exec ds/lbctl -- lbctl services
kubectl -n lb-system exec ds/lbctl -- lbctl status
