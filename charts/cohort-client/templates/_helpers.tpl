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
