# The IRSA role of the raystream ServiceAccount (cluster/base/serviceaccount.yaml): trusted only by that
# ServiceAccount of this cluster's OIDC provider; allowed the data bucket, the data key, and MSK through IAM
# on this cluster's topics and groups. Nothing else.

data "aws_iam_policy_document" "raystream_assume" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [aws_iam_openid_connect_provider.eks.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${replace(aws_iam_openid_connect_provider.eks.url, "https://", "")}:sub"
      values   = ["system:serviceaccount:${var.raystream_namespace}:raystream"]
    }
    condition {
      test     = "StringEquals"
      variable = "${replace(aws_iam_openid_connect_provider.eks.url, "https://", "")}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "raystream" {
  name               = "${var.name}-raystream"
  assume_role_policy = data.aws_iam_policy_document.raystream_assume.json
  tags               = local.tags
}

locals {
  msk_arn_parts = split("/", aws_msk_cluster.this.arn) # arn:...:cluster/<name>/<uuid>
  msk_topics    = "arn:${local.partition}:kafka:${local.region}:${local.account_id}:topic/${local.msk_arn_parts[1]}/${local.msk_arn_parts[2]}/*"
  msk_groups    = "arn:${local.partition}:kafka:${local.region}:${local.account_id}:group/${local.msk_arn_parts[1]}/${local.msk_arn_parts[2]}/*"
}

data "aws_iam_policy_document" "raystream" {
  statement {
    sid       = "DataBucketObjects"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.data.arn}/*"]
  }
  statement {
    sid       = "DataBucketList"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.data.arn]
  }
  statement {
    sid       = "DataKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
    resources = [aws_kms_key.data.arn]
  }
  statement {
    sid       = "KafkaConnect"
    actions   = ["kafka-cluster:Connect", "kafka-cluster:DescribeCluster"]
    resources = [aws_msk_cluster.this.arn]
  }
  statement {
    sid = "KafkaTopics"
    actions = ["kafka-cluster:DescribeTopic", "kafka-cluster:CreateTopic", "kafka-cluster:ReadData", "kafka-cluster:WriteData",
    "kafka-cluster:DescribeTopicDynamicConfiguration"]
    resources = [local.msk_topics]
  }
  statement {
    sid       = "KafkaGroups"
    actions   = ["kafka-cluster:AlterGroup", "kafka-cluster:DescribeGroup"]
    resources = [local.msk_groups]
  }
  statement {
    sid       = "KafkaIdempotentProducer"
    actions   = ["kafka-cluster:WriteDataIdempotently"]
    resources = [aws_msk_cluster.this.arn]
  }
}

resource "aws_iam_policy" "raystream" {
  name   = "${var.name}-raystream"
  policy = data.aws_iam_policy_document.raystream.json
  tags   = local.tags
}

resource "aws_iam_role_policy_attachment" "raystream" {
  role       = aws_iam_role.raystream.name
  policy_arn = aws_iam_policy.raystream.arn
}
