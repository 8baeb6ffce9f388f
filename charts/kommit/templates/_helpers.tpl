{{/* The chart name (nameOverride wins). */}}
{{- define "kommit.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name of the release's objects: the release name, plus the chart name unless it
contains it already. */}}
{{- define "kommit.fullname" -}}
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

{{- define "kommit.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kommit.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kommit.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kommit.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kommit.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kommit.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kommit.leaseName" -}}
{{- default (include "kommit.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/* rbac.scope, checked. */}}
{{- define "kommit.scope" -}}
{{- $scope := .Values.rbac.scope }}
{{- if not (has $scope (list "cluster" "namespace")) }}
{{- fail (printf "rbac.scope must be cluster or namespace, not %q" $scope) }}
{{- end }}
{{- if and .Values.rbac.clusterAdmin (eq $scope "namespace") }}
{{- fail "rbac.clusterAdmin only goes with rbac.scope=cluster" }}
{{- end }}
{{- $scope }}
{{- end }}

{{/* The namespaces kommit may deploy into with scope=namespace, as a JSON list. */}}
{{- define "kommit.namespaces" -}}
{{- if .Values.rbac.namespaces }}
{{- toJson (uniq .Values.rbac.namespaces) }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/* The namespace whose GitSyncs the operator reconciles; empty for all of them. */}}
{{- define "kommit.watchNamespace" -}}
{{- if .Values.operator.watchNamespace }}
{{- .Values.operator.watchNamespace }}
{{- else if eq (include "kommit.scope" .) "namespace" }}
{{- $namespaces := include "kommit.namespaces" . | fromJsonArray }}
{{- if eq (len $namespaces) 1 }}
{{- first $namespaces }}
{{- else }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kommit.webhookSecretName" -}}
{{- if .Values.webhook.secretName }}
{{- .Values.webhook.secretName }}
{{- else if .Values.webhook.secret }}
{{- printf "%s-webhook" (include "kommit.fullname" .) }}
{{- end }}
{{- end }}

{{/* The rules of the namespaces kommit deploys into: what it applies and prunes, what it reads
for health, its events and its record. Used by the ClusterRole and by each namespaced Role. */}}
{{- define "kommit.deployRules" -}}
# Health: kommit watches rollouts like `kubectl rollout status` does (and lists ReplicaSets to
# tell a rollback from a new revision).
- apiGroups: [apps]
  resources: [deployments, replicasets]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# Events on the objects a sync concerns (events.k8s.io/v1).
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
# The record of outcomes: ConfigMap kommit-record-<inventory> in the target namespace.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
# The kinds kommit applies and prunes (rbac.managedResources).
{{- range .Values.rbac.managedResources }}
- apiGroups: {{ toJson .apiGroups }}
  resources: {{ toJson .resources }}
  verbs: {{ toJson (default $.Values.rbac.managedVerbs .verbs) }}
{{- end }}
{{- with .Values.rbac.extraRules }}
# rbac.extraRules
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The rules of the namespace(s) whose GitSyncs the operator reconciles. */}}
{{- define "kommit.gitsyncRules" -}}
# GitSyncs: watched, annotated (a webhook asks for an immediate fetch), status written.
- apiGroups: [kommit.dev]
  resources: [gitsyncs]
  verbs: [get, list, watch, patch]
- apiGroups: [kommit.dev]
  resources: [gitsyncs/status]
  verbs: [patch]
# Git credentials named by a GitSync's spec.secretRef.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}
