{{- define "cohort-client.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* One release per party: <release>-<chart>, or the release name when it contains the chart name. */}}
{{- define "cohort-client.fullname" -}}
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

{{- define "cohort-client.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cohort-client.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cohort-client.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: task-manager
{{- end }}

{{- define "cohort-client.labels" -}}
{{ include "cohort-client.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cohort
helm.sh/chart: {{ include "cohort-client.chart" . }}
cohort.dev/party: {{ .Values.party.name | quote }}
{{- end }}

{{- define "cohort-client.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/* True when executors run as pods. */}}
{{- define "cohort-client.kubeLauncher" -}}
{{- if eq .Values.executor.launcher "kubernetes" }}true{{ else if ne .Values.executor.launcher "local" }}{{ fail (printf "executor.launcher must be local or kubernetes, not %q" .Values.executor.launcher) }}{{ end }}
{{- end }}

{{- define "cohort-client.datasetsConfigMap" -}}
{{- .Values.datasets.existingConfigMap | default (printf "%s-datasets" (include "cohort-client.fullname" .)) }}
{{- end }}

{{- define "cohort-client.tlsSecret" -}}
{{- .Values.party.tlsSecret | default (printf "%s-tls" .Values.party.name) }}
{{- end }}

{{- define "cohort-client.executorConfigMap" -}}
{{- printf "%s-executor" (include "cohort-client.fullname" .) }}
{{- end }}

{{/*
The executor Pod settings the kubernetes launcher reads (COHORT_EXECUTOR_POD_CONFIG), as JSON.
The task-manager rejects unknown keys, so only the keys it knows are emitted, and optional ones
are left out rather than set to null.
*/}}
{{- define "cohort-client.executorPodConfig" -}}
{{- $e := .Values.executor }}
{{- $gpuResource := required "executor.gpuResource is required" $e.gpuResource }}
{{- $gpus := $e.gpus | default 0 | int }}
{{- if lt $gpus 0 }}
{{- fail (printf "executor.gpus must be 0 or more, not %d" $gpus) }}
{{- end }}
{{- $poll := $e.pollIntervalSeconds | default 2 | int }}
{{- if lt $poll 1 }}
{{- fail (printf "executor.pollIntervalSeconds must be at least 1, not %d" $poll) }}
{{- end }}
{{- $cfg := dict
      "namespace" .Release.Namespace
      "image" (include "cohort-client.image" .)
      "command" (list "/usr/local/bin/executor")
      "gpuResource" $gpuResource
      "gpus" $gpus
      "pinToNode" (eq (toString $e.pinToNode) "true")
      "hostNetwork" (eq (toString .Values.hostNetwork) "true")
      "tlsSecret" (include "cohort-client.tlsSecret" .)
      "env" (concat (list (dict "name" "COHORT_LOG_FORMAT" "value" (toString .Values.logFormat))) (include "cohort-client.otelEnv" (dict "root" . "service" "executor") | fromYamlArray))
      "pollIntervalSeconds" $poll }}
{{- with .Values.image.pullPolicy }}
{{- $_ := set $cfg "imagePullPolicy" . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
{{- $_ := set $cfg "imagePullSecrets" . }}
{{- end }}
{{- /* Quantities as strings (a Quantity is a string), whatever YAML made of them. */}}
{{- $resources := dict }}
{{- range $key, $value := $e.resources }}
{{- if and (has $key (list "requests" "limits")) (kindIs "map" $value) }}
{{- if hasKey $value $gpuResource }}
{{- fail (printf "executor.resources.%s.%s: give GPUs as executor.gpus" $key $gpuResource) }}
{{- end }}
{{- $quantities := dict }}
{{- range $name, $amount := $value }}
{{- if not (kindIs "invalid" $amount) }}
{{- $_ := set $quantities $name (toString $amount) }}
{{- end }}
{{- end }}
{{- if $quantities }}
{{- $_ := set $resources $key $quantities }}
{{- end }}
{{- else if not (kindIs "invalid" $value) }}
{{- $_ := set $resources $key $value }}
{{- end }}
{{- end }}
{{- if $resources }}
{{- $_ := set $cfg "resources" $resources }}
{{- end }}
{{- with $e.nodeSelector }}
{{- $_ := set $cfg "nodeSelector" . }}
{{- end }}
{{- with $e.tolerations }}
{{- $_ := set $cfg "tolerations" . }}
{{- end }}
{{- with $e.affinity }}
{{- $_ := set $cfg "affinity" . }}
{{- end }}
{{- /* The dataset volumes, mounted at the task-manager's paths: task files name those. */}}
{{- $volumes := list }}
{{- $mounts := list }}
{{- range .Values.datasets.volumes }}
{{- $name := printf "data-%s" (required "each datasets.volumes entry needs a name" .name) }}
{{- $volumes = append $volumes (set (omit . "name" "mountPath" "readOnly" "subPath") "name" $name) }}
{{- $mount := dict "name" $name "mountPath" (required (printf "datasets.volumes %s needs a mountPath" .name) .mountPath) "readOnly" (ternary .readOnly true (hasKey . "readOnly")) }}
{{- with .subPath }}
{{- $_ := set $mount "subPath" . }}
{{- end }}
{{- $mounts = append $mounts $mount }}
{{- end }}
{{- $_ := set $cfg "volumes" $volumes }}
{{- $_ := set $cfg "volumeMounts" $mounts }}
{{- with .Values.podSecurityContext }}
{{- $_ := set $cfg "podSecurityContext" . }}
{{- end }}
{{- with .Values.securityContext }}
{{- $_ := set $cfg "securityContext" . }}
{{- end }}
{{- toPrettyJson $cfg }}
{{- end }}

{{/*
The OTEL_* variables of a container when otel.endpoint is set (nothing otherwise), as a YAML
list. Call with (dict "root" $ "service" "proxy"): the service name its traces carry.
*/}}
{{- define "cohort-client.otelEnv" -}}
{{- $o := .root.Values.otel | default dict }}
{{- if $o.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $o.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .service | quote }}
{{- with $o.sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ . | quote }}
{{- end }}
{{- if not (kindIs "invalid" $o.samplerArg) }}{{ if ne (toString $o.samplerArg) "" }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $o.samplerArg | toString | quote }}
{{- end }}{{ end }}
{{- with $o.resourceAttributes }}
{{- $attrs := . }}
{{- $pairs := list }}
{{- range $k := keys $attrs | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $k (toString (get $attrs $k))) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $pairs | quote }}
{{- end }}
{{- end }}
{{- end }}
