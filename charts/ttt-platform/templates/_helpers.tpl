{{/*
Names, labels and the derived settings every template agrees on.
Object names are cut to 63 characters (the DNS-label limit of Service and label values).
*/}}

{{- define "ttt-platform.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>", or the release name alone when it already contains the chart name. */}}
{{- define "ttt-platform.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ttt-platform.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select a component's pods; call with (dict "root" $ "component" "operator"). */}}
{{- define "ttt-platform.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ttt-platform.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of every object; call with (dict "root" $ "component" "operator"). */}}
{{- define "ttt-platform.labels" -}}
helm.sh/chart: {{ include "ttt-platform.chart" .root }}
{{ include "ttt-platform.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: ttt-platform
{{- end }}

{{/* "repository:tag" of a component image; call with (dict "root" $ "image" .Values.operator.image). */}}
{{- define "ttt-platform.image" -}}
{{- $global := .root.Values.image }}
{{- $repository := default $global.repository .image.repository }}
{{- $tag := default (default .root.Chart.AppVersion $global.tag) .image.tag }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{- define "ttt-platform.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
{{- if kindIs "string" . }}
  - name: {{ . | quote }}
{{- else }}
  - name: {{ .name | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ttt-platform.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "ttt-platform.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name must name an existing ServiceAccount when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Pod-level security settings shared by every pod of the chart. */}}
{{- define "ttt-platform.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ .Values.podSecurity.runAsUser }}
  {{- with .Values.podSecurity.runAsGroup }}
  runAsGroup: {{ . }}
  {{- end }}
  {{- with .Values.podSecurity.fsGroup }}
  fsGroup: {{ . }}
  {{- end }}
  seccompProfile:
    type: RuntimeDefault
{{- end }}

{{/* Container-level security settings shared by every container of the chart. */}}
{{- define "ttt-platform.containerSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
{{- end }}

{{/* ---------- MLflow ---------- */}}

{{- define "ttt-platform.mlflow.serviceName" -}}
{{- printf "%s-mlflow" (include "ttt-platform.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The tracking URI pods log to: the in-chart server, or the external one (then required). */}}
{{- define "ttt-platform.mlflow.trackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc:5000" (include "ttt-platform.mlflow.serviceName" .) .Release.Namespace }}
{{- else }}
{{- required "mlflow.external.trackingUri is required when mlflow.enabled is false (e.g. --set mlflow.external.trackingUri=http://mlflow.tracking.svc:5000)" .Values.mlflow.external.trackingUri }}
{{- end }}
{{- end }}

{{/* "true" when the server keeps something on its own volume: the sqlite database or local artifacts. */}}
{{- define "ttt-platform.mlflow.needsVolume" -}}
{{- if or (not .Values.mlflow.backendStore.existingSecret) (not .Values.mlflow.artifacts.destination) }}true{{ end }}
{{- end }}

{{- define "ttt-platform.mlflow.claimName" -}}
{{- default (include "ttt-platform.mlflow.serviceName" .) .Values.mlflow.persistence.existingClaim }}
{{- end }}

{{/* Host headers the server accepts: its service names, localhost and private IPs (MLflow's own
     defaults, which setting the list replaces), and mlflow.allowedHosts. */}}
{{- define "ttt-platform.mlflow.allowedHosts" -}}
{{- $svc := include "ttt-platform.mlflow.serviceName" . }}
{{- $ns := .Release.Namespace }}
{{- $hosts := list }}
{{- range (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) "localhost" "127.0.0.1" "[::1]") }}
{{- $hosts = append $hosts . }}
{{- $hosts = append $hosts (printf "%s:*" (replace "[" "[[]" .)) }}
{{- end }}
{{- $hosts = concat $hosts (list "10.*" "192.168.*") }}
{{- range $second := untilStep 16 32 1 }}
{{- $hosts = append $hosts (printf "172.%d.*" $second) }}
{{- end }}
{{- $hosts = concat $hosts (list "fc00:*" "fd00:*") .Values.mlflow.allowedHosts }}
{{- join "," $hosts }}
{{- end }}

{{/* The backend store URI of the server and of its db-upgrade initContainer: the Secret's (the kubelet
     substitutes $(MLFLOW_BACKEND_STORE_URI) from the container's env), or sqlite on the MLflow volume. */}}
{{- define "ttt-platform.mlflow.backendStoreUri" -}}
{{- if .Values.mlflow.backendStore.existingSecret }}$(MLFLOW_BACKEND_STORE_URI){{ else }}sqlite:////mlflow/mlflow.db{{ end }}
{{- end }}

{{/* The env entry behind $(MLFLOW_BACKEND_STORE_URI); empty with sqlite. */}}
{{- define "ttt-platform.mlflow.backendStoreEnv" -}}
{{- with .Values.mlflow.backendStore.existingSecret -}}
- name: MLFLOW_BACKEND_STORE_URI
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.mlflow.backendStore.existingSecretKey }}
{{- end }}
{{- end }}

{{/* "true" when the server mounts the MLflow volume: for sqlite, local artifacts or the basic-auth users. */}}
{{- define "ttt-platform.mlflow.usesVolume" -}}
{{- if or (include "ttt-platform.mlflow.needsVolume" .) .Values.mlflow.auth.enabled }}true{{ end }}
{{- end }}

{{/* basic_auth.ini of MLflow's basic-auth app (MLFLOW_AUTH_CONFIG_PATH); the admin password and the Flask
     secret key come from mlflow.auth.existingSecret, as environment variables. */}}
{{- define "ttt-platform.mlflow.authConfig" -}}
[mlflow]
default_permission = {{ .Values.mlflow.auth.defaultPermission }}
database_uri = sqlite:////mlflow/basic_auth.db
admin_username = {{ .Values.mlflow.auth.adminUsername }}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
{{- end }}

{{/* MLflow settings that cannot work together, refused before anything is installed. */}}
{{- define "ttt-platform.mlflow.validate" -}}
{{- $m := .Values.mlflow }}
{{- if $m.auth.enabled }}
{{- $_ := required "mlflow.auth.existingSecret is required when mlflow.auth.enabled is true: a Secret with keys admin-password and flask-secret-key (kubectl create secret generic mlflow-auth --from-literal=admin-password=... --from-literal=flask-secret-key=$(openssl rand -hex 32))" $m.auth.existingSecret }}
{{- end }}
{{- $replicas := int $m.replicas }}
{{- if gt $replicas 1 }}
{{- if not $m.backendStore.existingSecret }}
{{- fail (printf "mlflow.replicas=%d: the default backend store is one sqlite file on a volume, which takes one server (one writer at a time, \"database is locked\" otherwise): keep the runs in PostgreSQL (mlflow.backendStore.existingSecret, see ci/postgres-values.yaml) or set mlflow.replicas=1" $replicas) }}
{{- end }}
{{- if $m.auth.enabled }}
{{- fail (printf "mlflow.replicas=%d with mlflow.auth.enabled: the basic-auth users are a sqlite file on the MLflow volume, which takes one server: set mlflow.replicas=1 (more workers are fine: mlflow.workers)" $replicas) }}
{{- end }}
{{- if and (not $m.artifacts.destination) (not $m.persistence.existingClaim) (ne $m.persistence.accessMode "ReadWriteMany") }}
{{- fail (printf "mlflow.replicas=%d: every replica mounts the MLflow volume for local artifacts, and a %s volume cannot be mounted on several nodes: put artifacts on S3 (mlflow.artifacts.destination=s3://bucket/prefix) or set mlflow.persistence.accessMode=ReadWriteMany" $replicas $m.persistence.accessMode) }}
{{- end }}
{{- end }}
{{- end }}

{{/* ---------- Runs storage ---------- */}}

{{/* "true" when runs go to S3 rather than to the shared runs volume. */}}
{{- define "ttt-platform.storage.isS3" -}}
{{- if hasPrefix "s3://" .Values.storage.uri }}true{{ end }}
{{- end }}

{{/* TTT_STORAGE_URI: the S3 URI, the given path, or the mount path of the runs volume. */}}
{{- define "ttt-platform.storage.uri" -}}
{{- $uri := .Values.storage.uri }}
{{- $mount := .Values.storage.mountPath | trimSuffix "/" }}
{{- if or (hasPrefix "s3://" $uri) (not $uri) }}
{{- default $mount $uri }}
{{- else if or (eq $uri $mount) (hasPrefix (printf "%s/" $mount) $uri) }}
{{- $uri }}
{{- else }}
{{- fail (printf "storage.uri %q is a path outside storage.mountPath %q: use a path under the runs volume, or s3://bucket/prefix" $uri $mount) }}
{{- end }}
{{- end }}

{{/* TTT_RUNS_PVC: the runs claim when storage is a path, empty when it is S3. */}}
{{- define "ttt-platform.storage.claimName" -}}
{{- if not (include "ttt-platform.storage.isS3" .) }}
{{- default (printf "%s-runs" (include "ttt-platform.fullname" .)) .Values.storage.existingClaim }}
{{- end }}
{{- end }}

{{/* Combinations of values that cannot work, refused before anything is installed. */}}
{{- define "ttt-platform.validate" -}}
{{- $isS3 := include "ttt-platform.storage.isS3" . }}
{{- if not $isS3 }}
{{- range .Values.operator.watchNamespaces }}
{{- if ne . $.Release.Namespace }}
{{- fail (printf "operator.watchNamespaces lists %q, but runs go to the PersistentVolumeClaim %s in namespace %q, which Ray pods of another namespace cannot mount: use S3 storage (storage.uri=s3://bucket/prefix) or watch only %q" . (include "ttt-platform.storage.claimName" $) $.Release.Namespace $.Release.Namespace) }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.operator.mountRunsVolume }}
{{- if $isS3 }}
{{- fail "operator.mountRunsVolume: storage.uri is S3, there is no runs volume to mount (the operator reads progress from S3)" }}
{{- end }}
{{- if and (not .Values.storage.existingClaim) (eq .Values.storage.persistence.accessMode "ReadWriteOncePod") }}
{{- fail "operator.mountRunsVolume: a ReadWriteOncePod runs volume mounted by the operator could not be mounted by any Ray pod" }}
{{- end }}
{{- end }}
{{- end }}

{{/* TTT_IMAGE_PULL_SECRETS: operator.jobImagePullSecrets, or the names of the chart's imagePullSecrets. */}}
{{- define "ttt-platform.operator.jobImagePullSecrets" -}}
{{- $names := .Values.operator.jobImagePullSecrets }}
{{- if not $names }}
{{- range .Values.imagePullSecrets }}
{{- $names = append $names (kindIs "string" . | ternary . (get (kindIs "map" . | ternary . dict) "name")) }}
{{- end }}
{{- end }}
{{- join "," $names }}
{{- end }}
