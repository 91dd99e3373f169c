{{/*
Ports by convention: gRPC 9400-9403, metrics 9410-9413.
*/}}
{{- define "weft.ports" -}}
svc-watcher: {grpc: 9400, metrics: 9410}
ipam-svc: {grpc: 9401, metrics: 9411}
identity-svc: {grpc: 9402, metrics: 9412}
datapath: {grpc: 9403, metrics: 9413}
{{- end }}

{{- define "weft.grpcPort" -}}
{{- get (get (include "weft.ports" .root | fromYaml) .component) "grpc" -}}
{{- end }}

{{- define "weft.metricsPort" -}}
{{- get (get (include "weft.ports" .root | fromYaml) .component) "metrics" -}}
{{- end }}

{{/*
The release's base name: the release name, with the chart name unless the
release name already contains it.
*/}}
{{- define "weft.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{/* A component's object name: weft-svc-watcher, weft-datapath, ... */}}
{{- define "weft.componentName" -}}
{{- printf "%s-%s" (include "weft.fullname" .root) .component -}}
{{- end }}

{{/* The environment variable Kubernetes sets for a Service's cluster IP. */}}
{{- define "weft.serviceHostEnv" -}}
{{- printf "%s_SERVICE_HOST" (include "weft.componentName" . | upper | replace "-" "_") -}}
{{- end }}

{{/*
How other components reach a control-plane component: controlPlane.host
when set, else the component's Service cluster IP through the variable
Kubernetes sets for it. Not a DNS name: cluster DNS runs in pods, and pods
need the pod network, which needs the control plane.
*/}}
{{- define "weft.controlPlaneAddress" -}}
{{- $port := include "weft.grpcPort" . -}}
{{- if .root.Values.controlPlane.host -}}
{{- printf "http://%s:%s" .root.Values.controlPlane.host $port -}}
{{- else -}}
{{- printf "http://$(%s):%s" (include "weft.serviceHostEnv" .) $port -}}
{{- end -}}
{{- end }}

{{- define "weft.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: weft
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{ include "weft.selectorLabels" . }}
{{- end }}

{{- define "weft.selectorLabels" -}}
app.kubernetes.io/name: {{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}

{{- define "weft.image" -}}
{{- $img := .Values.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end }}

{{- define "weft.serviceAccountName" -}}
{{- if .root.Values.serviceAccounts.create -}}
{{- include "weft.componentName" . -}}
{{- else -}}
default
{{- end -}}
{{- end }}

{{/* Flags every service takes (weft_common::config::CommonArgs). */}}
{{- define "weft.commonArgs" -}}
- --log-level={{ .root.Values.logging.level }}
- --log-format={{ .root.Values.logging.format }}
{{- if .root.Values.prometheus.enabled }}
- --metrics-listen=0.0.0.0:{{ include "weft.metricsPort" . }}
{{- end }}
{{- if .root.Values.otlp.endpoint }}
- --otlp-endpoint={{ .root.Values.otlp.endpoint }}
{{- end }}
{{- end }}

{{/*
The API server for components that talk to it: kube-rs's in-cluster
configuration reads these two variables.
*/}}
{{- define "weft.apiServerEnv" -}}
{{- if .Values.k8sServiceHost }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.k8sServiceHost | quote }}
{{- end }}
{{- if .Values.k8sServicePort }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.k8sServicePort | quote }}
{{- end }}
{{- end }}

{{/*
An environment variable from a key of the weft-config ConfigMap; an absent
key leaves the variable unset.
*/}}
{{- define "weft.configEnv" -}}
- name: {{ .name }}
  valueFrom:
    configMapKeyRef:
      name: {{ include "weft.componentName" (dict "root" .root "component" "config") }}
      key: {{ .key }}
      optional: true
{{- end }}

{{/* mTLS material (pending in the binaries). */}}
{{- define "weft.tlsEnv" -}}
{{- if .Values.tls.enabled }}
{{- range $key := list "tls-cert" "tls-key" "tls-ca" }}
{{ include "weft.configEnv" (dict "root" $ "name" (printf "WEFT_%s" ($key | upper | replace "-" "_")) "key" $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Leader election settings of an allocator (pending in the binaries). */}}
{{- define "weft.leaderElectionEnv" -}}
{{- range $key := list "leader-election" "leader-election-lease-duration" "leader-election-renew-deadline" "leader-election-retry-period" }}
{{ include "weft.configEnv" (dict "root" $.root "name" (printf "WEFT_%s" ($key | upper | replace "-" "_")) "key" $key) }}
{{- end }}
- name: WEFT_LEADER_ELECTION_LEASE
  value: {{ include "weft.componentName" . }}
- name: WEFT_LEADER_ELECTION_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: WEFT_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}

{{- define "weft.tlsVolumeMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/weft/tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "weft.tlsVolume" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0400
{{- end }}
{{- end }}

{{/*
Probes. Startup and readiness ask the gRPC health service (Kubernetes >=
1.24), which says NOT_SERVING while a service cannot do its job: svc-watcher
before its first complete list or while a watch has been broken beyond
--watch-unready-after, ipam-svc and identity-svc while their store has not
reached the API for --api-unready-after. Liveness asks only whether the
process answers (the metrics server's /healthz, or the gRPC port): a restart
would not bring the API back, and would lose what the service keeps serving
from memory meanwhile.
*/}}
{{- define "weft.probes" -}}
startupProbe:
  grpc:
    port: {{ include "weft.grpcPort" . }}
  periodSeconds: 2
  failureThreshold: 60
readinessProbe:
  grpc:
    port: {{ include "weft.grpcPort" . }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  {{- if .root.Values.prometheus.enabled }}
  httpGet:
    path: /healthz
    port: {{ include "weft.metricsPort" . }}
  {{- else }}
  tcpSocket:
    port: {{ include "weft.grpcPort" . }}
  {{- end }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
{{- end }}

{{/* The container security of the control plane: nothing it does needs root. */}}
{{- define "weft.restrictedSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "weft.podMetadata" -}}
labels:
  {{- include "weft.labels" . | nindent 2 }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
  {{- with .root.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/*
Scheduling shared by the control-plane Deployments: with host networking,
two replicas of a component on one node would fight over its ports.
*/}}
{{- define "weft.controlPlaneScheduling" -}}
{{- $values := .values -}}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $values.affinity }}
affinity:
  {{- toYaml $values.affinity | nindent 2 }}
{{- else if .root.Values.controlPlane.hostNetwork }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "weft.selectorLabels" . | nindent 12 }}
{{- end }}
{{- with $values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* Checks that stop a configuration that cannot work, with the reason. */}}
{{- define "weft.validate" -}}
{{- if .Values.kubeProxyReplacement }}
{{- if not (and .Values.k8sServiceHost .Values.k8sServicePort) }}
{{- fail "kubeProxyReplacement=true needs k8sServiceHost and k8sServicePort: without kube-proxy the \"kubernetes\" Service's cluster IP does not work until weft runs" }}
{{- end }}
{{- if not .Values.controlPlane.host }}
{{- fail "kubeProxyReplacement=true needs controlPlane.host: nodes must reach svc-watcher, ipam-svc and identity-svc without a cluster IP (see values.yaml)" }}
{{- end }}
{{- end }}
{{- range $name, $c := dict "ipamSvc" .Values.ipamSvc "identitySvc" .Values.identitySvc }}
{{- if and (gt (int $c.replicas) 1) (ne $c.store "kubernetes") }}
{{- fail (printf "%s.replicas=%d needs %s.store=kubernetes: replicas with local stores would allocate independently" $name (int $c.replicas) $name) }}
{{- end }}
{{- end }}
{{- end }}
