{{/* Labels of every object. */}}
{{- define "lbctl.labels" -}}
app.kubernetes.io/name: lbctl
app.kubernetes.io/part-of: lbctl
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The DaemonSet's selector: the same as deploy/'s. */}}
{{- define "lbctl.selectorLabels" -}}
app.kubernetes.io/name: lbctl
{{- end }}

{{/*
A value as a flag's argument: numbers from values.yaml arrive as float64,
which would print 1000000 as 1e+06.
*/}}
{{- define "lbctl.arg" -}}
{{- if kindIs "float64" . -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end }}
