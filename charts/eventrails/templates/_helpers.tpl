{{/* Names, labels and the operator's RBAC rules, shared by the templates. */}}

{{- define "eventrails.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-eventrails", or the release name alone when it already contains the chart name. */}}
{{- define "eventrails.fullname" -}}
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

{{- define "eventrails.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eventrails.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "eventrails.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "eventrails.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: eventrails
{{- end }}

{{- define "eventrails.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "eventrails.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false: name the ServiceAccount the operator runs as" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "eventrails.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "eventrails.workerImage" -}}
{{- $worker := .Values.operator.workerImage }}
{{- printf "%s:%s" $worker.repository (default .Chart.AppVersion $worker.tag) }}
{{- end }}

{{- define "eventrails.peeringName" -}}
{{- default (include "eventrails.fullname" .) .Values.peering.name }}
{{- end }}

{{/* True (non-empty) when the operator watches a list of namespaces instead of the whole cluster. */}}
{{- define "eventrails.namespaced" -}}
{{- if .Values.watchNamespaces }}true{{- end }}
{{- end }}

{{/*
The namespaces that get a default EventBus: the listed ones, else every watched
namespace, else the release namespace. Rendered as a JSON list for fromJsonArray.
*/}}
{{- define "eventrails.eventBusNamespaces" -}}
{{- $namespaces := .Values.defaultEventBus.namespaces | default .Values.watchNamespaces | default (list .Release.Namespace) }}
{{- $namespaces | uniq | toJson }}
{{- end }}

{{/*
What the operator does in a namespace it watches, and nothing more. No rule uses a
wildcard; tests/unit/test_chart_rbac.py checks that, and the end-to-end test runs the
operator with exactly these permissions.
*/}}
{{- define "eventrails.namespacedRules" -}}
# Watch the custom resources, and patch them for kopf's finalizer and its
# eventrails.dev/* annotations. The operator never writes a spec.
- apiGroups: ["eventrails.dev"]
  resources: ["eventbuses", "topics", "consumers"]
  verbs: ["get", "list", "watch", "patch"]
# Ready, Reconciling and Degraded conditions and the stream and consumer figures.
- apiGroups: ["eventrails.dev"]
  resources: ["eventbuses/status", "topics/status", "consumers/status"]
  verbs: ["patch"]
# Worker Deployments are owned by their Consumer with blockOwnerDeletion; clusters that
# enforce owner-reference permissions ask for this.
- apiGroups: ["eventrails.dev"]
  resources: ["consumers/finalizers"]
  verbs: ["update"]
# Worker Deployments of Consumers.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "create", "patch", "delete"]
{{- if ne .Values.operator.keda "off" }}
# KEDA ScaledObjects of Consumers with spec.autoscaling.
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "create", "patch", "delete"]
{{- end }}
# NATS credentials and TLS material named by EventBuses; read one at a time, never listed.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# Kubernetes Events about reconciles.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
