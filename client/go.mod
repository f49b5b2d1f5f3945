module github.com/analyticsd/analyticsd/client

go 1.26.8
