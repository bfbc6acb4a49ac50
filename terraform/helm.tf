# The KubeRay operator, from its chart with the values in cluster/helm (one file for both ways of installing).
# The caller configures the helm provider against this cluster (see examples/).

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = var.kuberay_chart_version
  namespace        = "kuberay-system"
  create_namespace = true
  atomic           = true
  timeout          = 600
  values           = [file("${path.module}/../cluster/helm/kuberay-operator-values.yaml")]

  depends_on = [aws_eks_node_group.this["on-demand"]]
}
